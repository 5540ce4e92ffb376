"""What an emulated cluster is, re-exported from :mod:`lina.emulation_spec` (pure, no side
effects; it lives below :mod:`lina.config`, which validates a run's cluster with it).

Building the cluster is :mod:`lina.cluster.lifecycle`'s job, finding and removing clusters
:mod:`lina.cluster.registry`'s.
"""

from lina.emulation_spec import (  # noqa: F401  (re-exported)
    _MAX_RATE_BPS,
    SHARES,
    EmulateSpec,
    describe,
    format_rate,
    parse_duration_us,
    parse_emulate,
    parse_rate,
)

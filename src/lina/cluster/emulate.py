"""The emulated multi-host cluster, re-exported from the modules that hold it.

:mod:`lina.cluster.spec` (what to emulate, parsers), :mod:`lina.cluster.lifecycle` (building and
removing a cluster) and :mod:`lina.cluster.registry` (state files, surveys, clean-up).

Usage::

    spec = parse_emulate("hosts=4,link=200mbit,workers_per_host=1")
    with EmulatedCluster(spec) as cluster:
        subprocess.run(cluster.wrap(0, ["python", "-m", "x"]), env=cluster.host_env(0))
"""

from lina.cluster.lifecycle import EmulatedCluster, Host
from lina.cluster.registry import (
    ClusterRecord,
    owner_alive,
    read_states,
    remove_cluster,
    state_dir,
    survey,
    teardown,
)
from lina.cluster.spec import EmulateSpec, format_rate, parse_duration_us, parse_emulate, parse_rate

__all__ = [
    "ClusterRecord",
    "EmulateSpec",
    "EmulatedCluster",
    "Host",
    "format_rate",
    "owner_alive",
    "parse_duration_us",
    "parse_emulate",
    "parse_rate",
    "read_states",
    "remove_cluster",
    "state_dir",
    "survey",
    "teardown",
]

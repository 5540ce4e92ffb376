"""Worker entry points that fail on purpose, for tests of the launchers' failure reports."""

from __future__ import annotations

import os
import time

from lina.errors import ConfigError


def fail_on_rank(rank: int, kind: str, message: str, others_sleep_s: float = 30.0) -> int:
    """On global rank ``rank`` raise ``kind`` (``"config"``: a :class:`ConfigError` with field
    ``workers``; ``"runtime"``: a RuntimeError) with ``message``; the other ranks sleep (the
    launcher must stop them). Returns the rank when it does not fail."""
    me = int(os.environ["RANK"])
    if me == rank:
        if kind == "config":
            raise ConfigError("workers", message, "use the worker count of the checkpoint")
        raise RuntimeError(message)
    time.sleep(others_sleep_s)
    return me

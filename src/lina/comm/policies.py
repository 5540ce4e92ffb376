"""Name -> gradient-sync policy. Every training run and benchmark picks its policy here."""

from __future__ import annotations

from lina.comm.gradsync import BucketedAsyncSync, GradSync, SequentialSync, TutelSync
from lina.comm.lina_sync import LinaSync
from lina.errors import ConfigError

POLICIES: dict[str, type[GradSync]] = {
    "sequential": SequentialSync,
    "deepspeed": BucketedAsyncSync,
    "tutel": TutelSync,
    "lina": LinaSync,
}


def make_policy(name: str, chunk_mb: float = 1.0, credit: int = 1, **kwargs) -> GradSync:
    """Build the named policy; ``kwargs`` are those of :class:`lina.comm.gradsync.GradSync`;
    ``chunk_mb`` and ``credit`` are used by ``lina`` only."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ConfigError("schedule", f"unknown schedule {name!r}", f"use one of {', '.join(sorted(POLICIES))}") from None
    if cls is LinaSync:
        return cls(chunk_mb=chunk_mb, credit=credit, **kwargs)
    return cls(**kwargs)

"""Name -> gradient-sync policy. Every training run and benchmark picks its policy here."""

from __future__ import annotations

from lina.comm.gradsync import POLICIES, GradSync
from lina.errors import ConfigError


def make_policy(name: str, **kwargs) -> GradSync:
    """Build the named policy; ``kwargs`` are those of :class:`lina.comm.gradsync.GradSync` plus
    policy-specific ones."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ConfigError("schedule", f"unknown schedule {name!r}", f"use one of {', '.join(sorted(POLICIES))}") from None
    return cls(**kwargs)

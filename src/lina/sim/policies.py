"""Training policies the simulator compares, named as in the real system.

A policy is an object of four choices; the step builder reads them and nothing else:

- ``a2a_split``: ``none`` (one synchronous all-to-all), ``tutel`` (``TrainSpec.tutel_chunks``
  pieces overlapped with the expert FFN), ``micro`` (Lina's micro-ops of ``chunk_mb``,
  pipelined with the expert FFN);
- ``grad_sync``: ``ddp`` (25 MB buckets allreduced as soon as ready, during backward),
  ``after`` (the same buckets once backward is over), ``microops`` (every gradient tensor
  split into ``chunk_mb`` pieces, never mixing tensors), ``none`` (no gradient traffic: the
  lower bound);
- ``priority``: an allreduce may start only while no all-to-all runs or waits;
- ``packing``: Lina's expert packing (double experts per device while the FFN of one micro-op
  is shorter than the all-to-all of one micro-op).
"""

from __future__ import annotations

from dataclasses import dataclass

from lina.errors import ConfigError


@dataclass(frozen=True)
class TrainPolicy:
    name: str
    a2a_split: str
    grad_sync: str
    priority: bool
    packing: bool
    description: str

    def __post_init__(self):
        if self.a2a_split not in ("none", "tutel", "micro"):
            raise ConfigError("a2a_split", f"unknown {self.a2a_split!r}", "use none, tutel or micro")
        if self.grad_sync not in ("ddp", "after", "microops", "none"):
            raise ConfigError("grad_sync", f"unknown {self.grad_sync!r}", "use ddp, after, microops or none")


TRAIN_POLICIES: dict[str, TrainPolicy] = {
    p.name: p
    for p in (
        TrainPolicy("deepspeed", "none", "ddp", False, False, "synchronous a2a; DDP buckets allreduced during backward"),
        TrainPolicy("sequential", "none", "after", False, False, "synchronous a2a; all allreduce after backward"),
        TrainPolicy("tutel", "tutel", "ddp", False, False, "a2a split to overlap the expert FFN; DDP buckets"),
        TrainPolicy("lina", "micro", "microops", True, False, "micro-ops, a2a first, a2a/FFN pipelining"),
        TrainPolicy("lina+packing", "micro", "microops", True, True, "lina plus expert packing"),
        TrainPolicy("lina-priority", "none", "ddp", True, False, "ablation: priority only, whole DDP buckets"),
        TrainPolicy("lina-partition", "none", "microops", True, False, "ablation: priority and partitioning, no pipelining"),
        TrainPolicy("lower-bound", "none", "none", False, False, "every a2a alone at full speed, allreduce hidden"),
    )
}

DEFAULT_TRAIN_POLICIES = ("deepspeed", "sequential", "tutel", "lina", "lina+packing")


def train_policy(name: str) -> TrainPolicy:
    """The policy called ``name``; a :class:`ConfigError` lists the known ones otherwise."""
    try:
        return TRAIN_POLICIES[name]
    except KeyError:
        raise ConfigError("policy", f"unknown training policy {name!r}", f"use one of {', '.join(TRAIN_POLICIES)}") from None

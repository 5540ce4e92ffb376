"""Build a rank's gradient sync from a training policy spec (:mod:`lina.policy`).

The spec's ``grad_sync`` picks the mechanism (``after``: :class:`SequentialSync`, ``ddp``:
:class:`BucketedAsyncSync`, ``microops``: :class:`LinaSync` and its priority scheduler, ``none``:
:class:`NoSync`, timing only) and its
``a2a_split`` whether the MoE layers pipeline their all-to-alls with the expert FFN; the built
object carries the policy's name.
"""

from __future__ import annotations

from lina.comm.gradsync import BucketedAsyncSync, GradSync, NoSync, SequentialSync
from lina.comm.lina_sync import LinaSync
from lina.errors import ConfigError
from lina.policy import TRAIN_POLICIES, TrainPolicy, train_policy

SYNC_CLASSES: dict[str, type[GradSync]] = {
    "after": SequentialSync,
    "ddp": BucketedAsyncSync,
    "microops": LinaSync,
    "none": NoSync,
}


def make_sync(policy: str | TrainPolicy, chunk_mb: float = 1.0, credit: int = 1, **kwargs) -> GradSync:
    """The gradient sync of ``policy`` (a spec or a registered name); ``kwargs`` are those of
    :class:`lina.comm.gradsync.GradSync`; ``chunk_mb`` and ``credit`` are used by micro-op
    policies only."""
    spec = train_policy(policy)
    if not spec.trainable:
        raise ConfigError(
            "policy",
            f"{spec.name!r} exists in the simulator only ({spec.description})",
            "train with one of " + ", ".join(n for n, p in TRAIN_POLICIES.items() if p.trainable),
        )
    cls = SYNC_CLASSES[spec.grad_sync]
    sync = cls(chunk_mb=chunk_mb, credit=credit, **kwargs) if spec.partitions_gradients else cls(**kwargs)
    sync.name = spec.name
    sync.pipelined = spec.pipelined
    return sync

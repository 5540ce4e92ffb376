"""What an MoE layer needs to talk to its expert-parallel peers: the group, the one timeline, and
the hooks through which a gradient-sync policy orders all-to-alls against allreduce."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.distributed as dist

from lina.obs.timeline import Timeline


def _no_begin(name: str, nbytes: int) -> Any:
    return None


def _no_end(token: Any) -> None:
    return None


def _no_hold() -> None:
    return None


@dataclass
class ExpertComm:
    """Expert-parallel communication context shared by the MoE layers of one rank.

    Attributes:
        group: the EP process group (None: single process, no all-to-all).
        timeline: where every all-to-all span is recorded.
        a2a_begin / a2a_end: called around each all-to-all (``token = begin(name, nbytes)`` when it
            is about to start, ``end(token)`` when it has completed); the ``lina`` policy marks the
            all-to-all waiting/running in its scheduler there.
        on_backward_reaches_moe: called when backward reaches a MoE layer's output (an all-to-all
            is about to come); the ``lina`` policy stops starting allreduce micro-ops there.
        pipeline_chunks: all-to-all micro-ops per exchange (1 = one synchronous all-to-all).
    """

    group: dist.ProcessGroup | None = None
    timeline: Timeline = field(default_factory=lambda: Timeline(enabled=False))
    a2a_begin: Callable[[str, int], Any] = _no_begin
    a2a_end: Callable[[Any], None] = _no_end
    on_backward_reaches_moe: Callable[[], None] = _no_hold
    pipeline_chunks: int = 1

    @property
    def size(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return 0 if self.group is None else dist.get_rank(self.group)

"""Pick Lina's allreduce micro-op size for this link and model with a short start-up sweep.

Small chunks let an all-to-all preempt the allreduce sooner; below some size per-op overhead
dominates. For each candidate size c, every rank allreduces the model's non-expert gradient
volume as ceil(B / c) micro-ops one after another; the choice is the smallest c whose time is
within ``tolerance`` of the fastest candidate. Rank 0 decides and broadcasts, so all ranks agree.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lina.obs.timeline import Timeline

CANDIDATES_MB = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass
class SweepResult:
    chosen_mb: float
    seconds: dict[float, float]  # candidate MB -> median time to allreduce the whole volume

    def describe(self) -> str:
        rows = "  ".join(f"{mb:g} MB: {s * 1e3:.1f} ms" for mb, s in self.seconds.items())
        return f"chunk sweep ({rows}) -> {self.chosen_mb:g} MB"


def sweep_chunk_size(
    group: dist.ProcessGroup,
    total_bytes: int,
    repeats: int = 2,
    tolerance: float = 0.10,
    candidates_mb: tuple[float, ...] = CANDIDATES_MB,
) -> SweepResult:
    """Time candidate micro-op sizes on ``group`` (a collective: every rank of the group calls it)."""
    total_bytes = max(total_bytes, 4)
    usable = [mb for mb in candidates_mb if mb * 1024 * 1024 <= total_bytes] or [candidates_mb[0]]
    buf = torch.zeros(total_bytes // 4)
    seconds: dict[float, float] = {}
    for mb in usable:
        n = max(1, int(mb * 1024 * 1024) // 4)
        times = []
        for _ in range(repeats):
            dist.barrier(group=group)
            t = Timeline.now()
            for chunk in buf.split(n):
                dist.all_reduce(chunk, group=group)
            times.append(Timeline.now() - t)
        seconds[mb] = statistics.median(times)
    best = min(seconds.values())
    choice = torch.tensor([min(mb for mb, s in seconds.items() if s <= best * (1 + tolerance))], dtype=torch.float64)
    dist.broadcast(choice, src=dist.get_global_rank(group, 0), group=group)
    return SweepResult(float(choice), seconds)

"""Process groups of an expert- and data-parallel job.

With world size W and expert-parallel size P (P divides W), ranks ``[g*P, (g+1)*P)`` form EP group
g (all-to-all among them); ranks with the same position in their EP group hold the same experts and
form an expert-data-parallel group (their expert gradients are summed). Non-expert gradients are
summed over all W ranks on a dedicated group, so that their allreduce runs on its own channels,
concurrently with the all-to-alls.

A group of one rank is never created: ``ep_group`` is None when P = 1 (every rank holds every
expert, no all-to-all) and ``expert_dp_group`` is None when P = W (no expert is replicated).

Expert packing changes P at run time; ``new_group`` is collective, so every layout a run may use is
created at start-up by :func:`build_group_set`, on every rank in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable

import torch.distributed as dist


@dataclass
class ParallelGroups:
    rank: int
    world_size: int
    ep_size: int
    ep_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    expert_dp_group: dist.ProcessGroup | None

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def ep_group_start(self) -> int:
        """Global rank of the first member of this rank's EP group."""
        return self.rank - self.ep_rank


def build_group_set(ep_sizes: Iterable[int], timeout_s: float) -> dict[int, ParallelGroups]:
    """Create the groups of every EP size in ``ep_sizes`` (each must divide the world size) on an
    initialised default process group; every rank must call this with the same sizes. All layouts
    share one data-parallel group. Returns EP size -> :class:`ParallelGroups`."""
    world = dist.get_world_size()
    rank = dist.get_rank()
    timeout = timedelta(seconds=timeout_s)
    sizes = sorted(set(ep_sizes), reverse=True)
    for ep in sizes:
        if ep < 1 or world % ep:
            raise ValueError(f"EP size {ep} does not divide the world size {world}")
    found: dict[int, tuple] = {}
    for ep in sizes:
        ep_group = expert_dp_group = None
        for g in range(world // ep if ep > 1 else 0):
            ranks = list(range(g * ep, (g + 1) * ep))
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                ep_group = group
        for pos in range(ep if ep < world else 0):
            ranks = list(range(pos, world, ep))
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                expert_dp_group = group
        found[ep] = (ep_group, expert_dp_group)
    dp_group = dist.new_group(list(range(world)), timeout=timeout)
    return {ep: ParallelGroups(rank, world, ep, g, dp_group, x) for ep, (g, x) in found.items()}


def build_groups(ep_size: int, timeout_s: float) -> ParallelGroups:
    """Create the groups of one layout (every rank must call this)."""
    return build_group_set([ep_size], timeout_s)[ep_size]

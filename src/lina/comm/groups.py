"""Process groups of an expert- and data-parallel job.

With world size W and expert-parallel size P (P divides W), ranks ``[g*P, (g+1)*P)`` form EP group
g (all-to-all among them); ranks with the same position in their EP group hold the same experts and
form an expert-data-parallel group (their expert gradients are summed). Non-expert gradients are
summed over all W ranks on a dedicated group, so that their allreduce runs on its own channels,
concurrently with the all-to-alls.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

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


def build_groups(ep_size: int, timeout_s: float) -> ParallelGroups:
    """Create the groups on an initialised default process group (every rank must call this)."""
    world = dist.get_world_size()
    rank = dist.get_rank()
    timeout = timedelta(seconds=timeout_s)
    ep_group = dp_group = expert_dp_group = None
    for g in range(world // ep_size):
        ranks = list(range(g * ep_size, (g + 1) * ep_size))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            ep_group = group
    for pos in range(ep_size):
        ranks = list(range(pos, world, ep_size))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            expert_dp_group = group
    dp_group = dist.new_group(list(range(world)), timeout=timeout)
    return ParallelGroups(rank, world, ep_size, ep_group, dp_group, expert_dp_group)

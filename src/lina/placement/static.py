"""The static expert-parallel layout of DeepSpeed-MoE: the baseline every policy is compared to."""

from __future__ import annotations

import torch

from lina.errors import ConfigError
from lina.placement.core import Placement


def static_placement(num_experts: int, num_devices: int) -> Placement:
    """Expert ``e`` on device ``e mod N``; with fewer experts than devices, replicate evenly.

    ``E >= N``: each device holds the experts ``n, n+N, n+2N, ...`` (DeepSpeed's layout,
    several experts per device when ``E > N``). ``E < N``: device ``n`` holds expert
    ``n mod E`` (expert-parallel groups of size E, data-parallel across groups), and each
    expert's tokens are split equally among its copies.

    Returns:
        a :class:`Placement` with ``share[E, N]``.
    """
    if num_experts < 1 or num_devices < 1:
        raise ConfigError("num_experts/num_devices", f"are {num_experts}/{num_devices}", "give at least 1 of each")
    holds = torch.zeros(num_experts, num_devices, dtype=torch.float64)
    if num_experts >= num_devices:
        holds[torch.arange(num_experts), torch.arange(num_experts) % num_devices] = 1.0
    else:
        holds[torch.arange(num_devices) % num_experts, torch.arange(num_devices)] = 1.0
    return Placement(num_experts, num_devices, holds / holds.sum(dim=1, keepdim=True))

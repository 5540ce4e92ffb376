"""The EPLB baseline (DeepSeek EPLB, vLLM/SGLang EPLB): replicas from past load, re-planned now and then.

Unlike Lina it never looks at the batch being served: it plans from a moving average of
the load of past batches and keeps the plan for ``replan_every`` batches.

Budget we chose: every device has ``slots_per_device`` expert slots (default
``ceil(E / N) + 1``), so there are ``N * slots_per_device - E`` redundant replicas in all
(one spare slot per device, and the rounding slack). The plan is DeepSeek's flat
(non-hierarchical) ``rebalance_experts``: (1) start from one replica per expert and give
each redundant replica to the expert with the largest load per replica; (2) pack the
replicas, heaviest first, onto the device with the least load that still has a free slot,
so every device ends with exactly ``slots_per_device`` replicas. Replicas of one expert
split its tokens equally.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from lina.errors import ConfigError
from lina.placement.core import Placement
from lina.placement.static import static_placement


def default_slots_per_device(num_experts: int, num_devices: int) -> int:
    """``ceil(E / N) + 1``: the experts of the static layout plus one redundant slot."""
    return math.ceil(num_experts / num_devices) + 1


def eplb_placement(load: torch.Tensor, num_devices: int, slots_per_device: int | None = None) -> Placement:
    """DeepSeek-style flat EPLB plan for one layer.

    Args:
        load: ``Tensor[E]`` load per expert (e.g. a moving average of token-slots), >= 0.
        num_devices: ``N``.
        slots_per_device: expert replicas each device holds; ``N * slots >= E``.
    Returns:
        a :class:`Placement` where every device holds ``slots_per_device`` replicas
        (two replicas of one expert on one device count as one held expert).
    """
    load = torch.as_tensor(load, dtype=torch.float64).flatten()
    num_experts = int(load.numel())
    slots = default_slots_per_device(num_experts, num_devices) if slots_per_device is None else slots_per_device
    if num_devices < 1:
        raise ConfigError("num_devices", f"is {num_devices}", "give at least 1 device")
    if slots * num_devices < num_experts:
        raise ConfigError(
            "slots_per_device",
            f"{slots} x {num_devices} devices < {num_experts} experts",
            f"give at least {math.ceil(num_experts / num_devices)}",
        )
    if not torch.isfinite(load).all() or (load < 0).any():
        raise ConfigError("load", "has negative or non-finite entries", "give token-slots per expert, >= 0")
    loads = load.tolist()
    replicas = [1] * num_experts
    for _ in range(slots * num_devices - num_experts):
        best = max(range(num_experts), key=lambda e: (loads[e] / replicas[e], -e))
        replicas[best] += 1
    items = sorted(
        ((loads[e] / replicas[e], e) for e in range(num_experts) for _ in range(replicas[e])),
        key=lambda it: (-it[0], it[1]),
    )
    device_load = [0.0] * num_devices
    used = [0] * num_devices
    share = torch.zeros(num_experts, num_devices, dtype=torch.float64)
    for weight, expert in items:
        device = min((n for n in range(num_devices) if used[n] < slots), key=lambda n: (device_load[n], n))
        device_load[device] += weight
        used[device] += 1
        share[expert, device] += 1.0 / replicas[expert]
    return Placement(num_experts, num_devices, share)


class EPLBPlanner:
    """EPLB over a serving run: plan from the mean load of the last ``window`` batches.

    Usage per layer: ``p = planner.placement`` for a batch, then
    ``planner.observe(real_counts)`` after its gate; every ``replan_every`` observed
    batches the plan is recomputed. Until the first re-plan, the static layout is used.

    Args:
        num_experts: ``E``.
        num_devices: ``N``.
        window: batches in the moving average (vLLM's ``window_size``).
        replan_every: batches between re-plans (vLLM's ``step_interval``).
        slots_per_device: see :func:`eplb_placement`.
    """

    def __init__(
        self,
        num_experts: int,
        num_devices: int,
        window: int = 32,
        replan_every: int = 8,
        slots_per_device: int | None = None,
    ):
        if window < 1:
            raise ConfigError("window", f"is {window}", "average over at least 1 batch")
        if replan_every < 1:
            raise ConfigError("replan_every", f"is {replan_every}", "re-plan every 1 or more batches")
        self.num_experts = num_experts
        self.num_devices = num_devices
        self.replan_every = replan_every
        self.slots_per_device = (
            default_slots_per_device(num_experts, num_devices) if slots_per_device is None else slots_per_device
        )
        self._history: deque[torch.Tensor] = deque(maxlen=window)
        self._since_plan = 0
        self.replans = 0
        self._placement: Placement = static_placement(num_experts, num_devices)
        self._planned_from: torch.Tensor | None = None  # the mean a re-plan is due on, planned when read

    @property
    def placement(self) -> Placement:
        """The current plan; a due re-plan is computed here, on first read (a planner whose
        placement nobody reads, e.g. an arm of ``lina-auto`` that is not serving, costs no planning)."""
        if self._planned_from is not None:
            self._placement = eplb_placement(self._planned_from, self.num_devices, self.slots_per_device)
            self._planned_from = None
        return self._placement

    def observe(self, counts: torch.Tensor) -> bool:
        """Record a batch's real token-slots per expert (``Tensor[E]``); returns True when it re-planned."""
        counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
        if counts.numel() != self.num_experts:
            raise ConfigError("counts", f"has {counts.numel()} entries", f"give one per expert ({self.num_experts})")
        self._history.append(counts)
        self._since_plan += 1
        if self._since_plan < self.replan_every:
            return False
        self._since_plan = 0
        self.replans += 1
        self._planned_from = torch.stack(list(self._history)).mean(dim=0)
        return True

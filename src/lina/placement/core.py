"""Where each expert's tokens go: the :class:`Placement` of one MoE layer on ``N`` devices.

A placement is a share matrix ``share[E, N]``: the fraction of expert ``e``'s token-slots
sent to device ``n``. A device *holds* expert ``e`` (has its weights) when
``share[e, n] > 0``; an expert held by several devices is *replicated* and its tokens are
split among the replicas in proportion to ``share``. Rows sum to 1, so every expert is
served somewhere (the model must answer a surprise token too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lina.errors import ConfigError

_ROW_SUM_TOL = 1e-5


@dataclass
class Placement:
    """Experts of one layer on devices.

    Args:
        num_experts: ``E``.
        num_devices: ``N``.
        share: ``FloatTensor[E, N]``, non-negative, each row sums to 1 (stored as float64,
            rows renormalised).
    """

    num_experts: int
    num_devices: int
    share: torch.Tensor

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ConfigError("num_experts", f"is {self.num_experts}", "give at least 1 expert")
        if self.num_devices < 1:
            raise ConfigError("num_devices", f"is {self.num_devices}", "give at least 1 device")
        share = torch.as_tensor(self.share, dtype=torch.float64)
        if share.shape != (self.num_experts, self.num_devices):
            raise ConfigError(
                "share",
                f"has shape {tuple(share.shape)}",
                f"give an [E, N] = [{self.num_experts}, {self.num_devices}] matrix",
            )
        if not torch.isfinite(share).all() or (share < 0).any():
            raise ConfigError("share", "has negative or non-finite entries", "give fractions in [0, 1]")
        rows = share.sum(dim=1)
        if (rows - 1.0).abs().max() > _ROW_SUM_TOL:
            bad = int((rows - 1.0).abs().argmax())
            raise ConfigError(
                "share", f"row of expert {bad} sums to {float(rows[bad]):.6f}", "make each expert's shares sum to 1"
            )
        self.share = share / rows[:, None]

    # ------------------------------------------------------------------ structure
    @property
    def holds(self) -> torch.Tensor:
        """``BoolTensor[E, N]``: device n holds expert e."""
        return self.share > 0

    def expert_devices(self, expert: int) -> torch.Tensor:
        """Devices holding ``expert``, ascending, ``LongTensor[r_e]``."""
        return torch.nonzero(self.holds[expert], as_tuple=False).flatten()

    def device_experts(self, device: int) -> torch.Tensor:
        """Experts held by ``device``, ascending, ``LongTensor[m_n]`` (may be empty)."""
        return torch.nonzero(self.holds[:, device], as_tuple=False).flatten()

    @property
    def experts_per_device(self) -> torch.Tensor:
        """``LongTensor[N]``: experts held by each device."""
        return self.holds.sum(dim=0)

    @property
    def replicas(self) -> torch.Tensor:
        """``LongTensor[E]``: devices holding each expert (>= 1)."""
        return self.holds.sum(dim=1)

    # ------------------------------------------------------------------ routing
    def route(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Device for every token-slot, deterministic.

        The slots of expert ``e`` are numbered 0..c_e-1 in token order (row-major over
        ``[T, k]``); replica ``j`` of ``e`` (devices ascending) takes the contiguous block
        of ranks ``[round(C_{j-1} c_e), round(C_j c_e))`` where ``C_j`` is the cumulative
        share. So each replica gets its share of slots up to rounding, and tokens keep
        their order within a replica.

        Args:
            expert_ids: ``LongTensor[T, k]`` (or any shape) of expert ids in ``[0, E)``.
        Returns:
            ``LongTensor`` of the same shape: the device of each slot.
        """
        flat = expert_ids.reshape(-1).long()
        if flat.numel() == 0:
            return torch.zeros_like(expert_ids, dtype=torch.long)
        if flat.min() < 0 or flat.max() >= self.num_experts:
            raise ConfigError(
                "expert_ids", f"holds ids outside [0, {self.num_experts})", "route ids of this layer's experts"
            )
        counts = torch.bincount(flat, minlength=self.num_experts)
        order = torch.argsort(flat, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(flat)
        rank[order] = torch.arange(flat.numel()) - starts[flat[order]]
        cum = torch.cumsum(self.share, dim=1)
        cum[:, -1] = 1.0
        bounds = torch.round(cum * counts[:, None].double()).long()  # [E, N]
        device = (rank[:, None] >= bounds[flat]).sum(dim=1)
        return device.reshape(expert_ids.shape)

    def device_load(self, counts: torch.Tensor) -> torch.Tensor:
        """Expected token-slots per device: ``counts[E] @ share[E, N] -> Tensor[N]`` (float64)."""
        counts = torch.as_tensor(counts, dtype=torch.float64)
        if counts.shape != (self.num_experts,):
            raise ConfigError(
                "counts",
                f"has shape {tuple(counts.shape)}",
                f"give token-slots per expert, shape ({self.num_experts},)",
            )
        return counts @ self.share

    @classmethod
    def from_assignment(
        cls, num_experts: int, num_devices: int, assignment: list[list[tuple[int, float]]]
    ) -> Placement:
        """Build from ``assignment[n] = [(expert, share), ...]`` per device."""
        share = torch.zeros(num_experts, num_devices, dtype=torch.float64)
        for device, items in enumerate(assignment):
            for expert, frac in items:
                share[expert, device] += frac
        return cls(num_experts, num_devices, share)


def max_device_load(placement: Placement, counts: torch.Tensor) -> float:
    """Token-slots of the busiest device: ``max(placement.device_load(counts))``.

    The cost model of inference all-to-all and expert compute: the batch waits for the
    device that receives the most tokens.
    """
    return float(placement.device_load(counts).max())


def imbalance(placement: Placement, counts: torch.Tensor) -> float:
    """Busiest device's load over the mean device load (1.0 = perfectly balanced)."""
    load = placement.device_load(counts)
    mean = float(load.sum()) / placement.num_devices
    return float(load.max()) / mean if mean > 0 else 1.0

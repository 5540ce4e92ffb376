"""Softmax top-k gate with capacity, balance loss, z-loss and gate noise (GShard / Switch style)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """The gate's decision for T tokens.

    Attributes:
        expert_ids: LongTensor[T, k], chosen experts, highest gate probability first.
        weights: FloatTensor[T, k], gate weights of the chosen experts (renormalised over the k
            choices when k > 1); 0 where the slot was dropped for capacity.
        kept: BoolTensor[T, k], False for token-slots dropped because their expert was full.
        aux_loss: scalar, weighted balance loss + z-loss (0 when both weights are 0).
        probs: FloatTensor[T, E], full softmax (kept for analysis and traces).
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor
    aux_loss: torch.Tensor
    probs: torch.Tensor


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Token-slots one expert accepts from one rank's batch: ceil(cf * T * k / E)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_mask(expert_ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Keep the first ``capacity`` slots of each expert, in priority order (all first choices
    before second choices, tokens in order within a choice).

    Args:
        expert_ids: LongTensor[T, k].
    Returns:
        BoolTensor[T, k].
    """
    t, k = expert_ids.shape
    flat = expert_ids.t().reshape(-1)  # [k*T], choice-major priority
    one_hot = F.one_hot(flat, num_experts)
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # rank of the slot within its expert
    return (position < capacity).reshape(k, t).t()


class TopKRouter(nn.Module):
    """Linear gate ``d_model -> E`` followed by softmax top-k.

    Args:
        d_model: token width.
        num_experts: E.
        top_k: experts per token (1 <= k <= E).
        capacity_factor: slots per expert = ceil(cf * T * k / E); ignored when ``dropless``.
        dropless: keep every token-slot.
        balance_loss_weight: weight of the GShard balance loss E * sum_e f_e * P_e.
        z_loss_weight: weight of the router z-loss mean(logsumexp(logits)^2).
        gate_noise: std of multiplicative-free additive Gaussian noise on logits in training.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float = 1.25,
        dropless: bool = True,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        gate_noise: float = 0.0,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.dropless = dropless
        self.balance_loss_weight = balance_loss_weight
        self.z_loss_weight = z_loss_weight
        self.gate_noise = gate_noise
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.02)
        self.noise_generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> Routing:
        """x: FloatTensor[T, d_model] -> :class:`Routing`."""
        logits = self.gate(x).float()
        if self.training and self.gate_noise > 0:
            noise = torch.randn(logits.shape, generator=self.noise_generator, dtype=logits.dtype)
            logits = logits + noise.to(logits.device) * self.gate_noise
        probs = logits.softmax(dim=-1)
        top_p, expert_ids = probs.topk(self.top_k, dim=-1)
        weights = top_p / top_p.sum(-1, keepdim=True) if self.top_k > 1 else top_p
        if self.dropless:
            kept = torch.ones_like(expert_ids, dtype=torch.bool)
        else:
            cap = expert_capacity(x.shape[0], self.num_experts, self.top_k, self.capacity_factor)
            kept = capacity_mask(expert_ids, self.num_experts, cap)
            weights = weights * kept
        aux = logits.new_zeros(())
        if self.balance_loss_weight > 0:
            aux = aux + self.balance_loss_weight * balance_loss(probs, expert_ids, self.num_experts)
        if self.z_loss_weight > 0:
            aux = aux + self.z_loss_weight * torch.logsumexp(logits, dim=-1).pow(2).mean()
        return Routing(expert_ids, weights.to(x.dtype), kept, aux, probs)


def balance_loss(probs: torch.Tensor, expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """GShard/Switch load-balancing loss: E * sum_e f_e * P_e, where f_e is the share of token-slots
    routed to e and P_e the mean gate probability of e. probs: [T, E]; expert_ids: [T, k]."""
    counts = torch.zeros(num_experts, device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(0, expert_ids.reshape(-1), torch.ones(expert_ids.numel(), device=probs.device, dtype=probs.dtype))
    f = counts / expert_ids.numel()
    return num_experts * (f * probs.mean(0)).sum()

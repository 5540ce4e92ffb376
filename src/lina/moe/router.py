"""Top-k gate with capacity, balance loss, z-loss and gate noise (GShard / Switch style), with the
options of :class:`lina.moe.spec.RouterSpec`: sigmoid scores, a selection-only correction bias
with auxiliary-loss-free balancing, group-limited top-k, routed scaling, capacity floor,
renormalisation after dropping and a first-choice-only balance loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lina.moe.spec import RouterSpec


@dataclass
class Routing:
    """The gate's decision for T tokens.

    Attributes:
        expert_ids: LongTensor[T, k], chosen experts, highest gate probability first.
        weights: FloatTensor[T, k], gate weights of the chosen experts (renormalised over the k
            choices when k > 1); 0 where the slot was dropped for capacity.
        kept: BoolTensor[T, k], False for token-slots dropped because their expert was full.
        aux_loss: scalar, weighted balance loss + z-loss (0 when both weights are 0).
        probs: FloatTensor[T, E], the scores of every expert (softmax, or sigmoid; kept for
            analysis and traces).
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor
    aux_loss: torch.Tensor
    probs: torch.Tensor


def expert_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int = 1
) -> int:
    """Token-slots one expert accepts from one rank's batch: max(min_capacity, ceil(cf * T * k / E))."""
    return max(min_capacity, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


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
        spec: scores, normalisation, correction bias, groups and conventions
            (:class:`lina.moe.spec.RouterSpec`; the default is the behaviour described above).

    With ``spec.correction_bias`` the router holds a buffer ``correction_bias [E]`` (fp32) and,
    in training, counts the token-slots each expert was chosen for in ``load [E]`` until
    :meth:`update_correction_bias` uses them.
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
        spec: RouterSpec | None = None,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.spec = spec or RouterSpec()
        self.spec.validate(num_experts, top_k)
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
        if self.spec.correction_bias:
            self.register_buffer("correction_bias", torch.zeros(num_experts))
            self.register_buffer("load", torch.zeros(num_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> Routing:
        """x: FloatTensor[T, d_model] -> :class:`Routing`."""
        logits = self.gate(x.to(self.gate.weight.dtype)).float()
        if self.training and self.gate_noise > 0:
            noise = torch.randn(logits.shape, generator=self.noise_generator, dtype=logits.dtype)
            logits = logits + noise.to(logits.device) * self.gate_noise
        spec = self.spec
        probs = logits.softmax(dim=-1) if spec.score == "softmax" else logits.sigmoid()
        expert_ids, top_p = self._choose(probs)
        norm = spec.norm_topk_prob if spec.norm_topk_prob is not None else self.top_k > 1
        weights = top_p
        if norm and not spec.renormalize_after_drop:
            denom = top_p.sum(-1, keepdim=True)
            weights = top_p / (denom + 1e-20 if spec.score == "sigmoid" else denom)  # sigmoid scores may all be ~0
        if self.dropless:
            kept = torch.ones_like(expert_ids, dtype=torch.bool)
        else:
            cap = expert_capacity(x.shape[0], self.num_experts, self.top_k, self.capacity_factor, spec.min_capacity)
            kept = capacity_mask(expert_ids, self.num_experts, cap)
            weights = weights * kept
        if norm and spec.renormalize_after_drop:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)
        if spec.routed_scaling_factor != 1.0:
            weights = weights * spec.routed_scaling_factor
        if spec.correction_bias and self.training:
            with torch.no_grad():
                self.load += torch.bincount(expert_ids.reshape(-1), minlength=self.num_experts).to(self.load)
        aux = logits.new_zeros(())
        if self.balance_loss_weight > 0:
            chosen = expert_ids[:, :1] if self.spec.balance_first_choice_only else expert_ids
            aux = aux + self.balance_loss_weight * balance_loss(probs, chosen, self.num_experts)
        if self.z_loss_weight > 0:
            aux = aux + self.z_loss_weight * torch.logsumexp(logits, dim=-1).pow(2).mean()
        return Routing(expert_ids, weights.to(x.dtype), kept, aux, probs)

    def _choose(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """probs [T, E] -> (expert_ids [T, k], their scores [T, k]). The correction bias and the
        group limit change which experts are chosen, never the scores returned."""
        spec = self.spec
        if not spec.correction_bias and spec.n_group == 1:
            top_p, expert_ids = probs.topk(self.top_k, dim=-1)
            return expert_ids, top_p
        choice = probs + self.correction_bias if spec.correction_bias else probs
        if spec.n_group > 1:
            t = choice.shape[0]
            grouped = choice.view(t, spec.n_group, -1)
            best = min(2, grouped.shape[-1])
            group_scores = grouped.topk(best, dim=-1)[0].sum(-1)  # [T, n_group]
            group_idx = group_scores.topk(spec.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()
            mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(t, -1)
            choice = choice.masked_fill(~mask, float("-inf"))
        expert_ids = choice.topk(self.top_k, dim=-1)[1]
        return expert_ids, probs.gather(1, expert_ids)

    @torch.no_grad()
    def update_correction_bias(self, group=None) -> torch.Tensor:
        """Auxiliary-loss-free balancing (DeepSeek-V3): ``bias += rate * sign(mean - load_e)``
        from the load counted since the last call (summed over ``group``, so every rank applies the
        same update), then reset the count. Returns the load used, FloatTensor[E]."""
        if not self.spec.correction_bias:
            raise ValueError("this router has no correction bias; build it with RouterSpec(correction_bias=True)")
        load = self.load.clone()
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(load, group=group)
        self.correction_bias += self.spec.bias_update_rate * torch.sign(load.mean() - load)
        self.load.zero_()
        return load


def balance_loss(probs: torch.Tensor, expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """GShard/Switch load-balancing loss: E * sum_e f_e * P_e, where f_e is the share of token-slots
    routed to e and P_e the mean gate probability of e. probs: [T, E]; expert_ids: [T, k]."""
    counts = torch.zeros(num_experts, device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(
        0, expert_ids.reshape(-1), torch.ones(expert_ids.numel(), device=probs.device, dtype=probs.dtype)
    )
    f = counts / expert_ids.numel()
    return num_experts * (f * probs.mean(0)).sum()

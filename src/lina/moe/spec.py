"""Typed description of an MoE layer's parts: its router, its experts, its shared experts.

Every default reproduces lina's own layer (softmax top-k, renormalised when k > 1, GELU experts
with biases, no shared expert), so ``MoESpec()`` changes nothing. The options reproduce the gate
conventions of other systems (see the README's table of gate conventions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCORES = ("softmax", "sigmoid")
ACTIVATIONS = ("gelu", "swiglu")


@dataclass(frozen=True)
class RouterSpec:
    """How a token's experts and their weights are chosen.

    Attributes:
        score: ``"softmax"`` over all experts, or ``"sigmoid"`` per expert (DeepSeek-V3).
        norm_topk_prob: renormalise the k chosen weights to sum to 1: None renormalises when
            k > 1 (lina's default), True always (Mixtral), False never (OLMoE, Qwen default).
        correction_bias: a per-expert bias added to the scores for choosing experts only, never
            to the weights (DeepSeek-V3's ``e_score_correction_bias``).
        bias_update_rate: step of the auxiliary-loss-free balance update of that bias:
            ``bias += rate * sign(mean load - load)`` after each step (0: the bias stays fixed).
        n_group, topk_group: group-limited routing: experts form ``n_group`` groups, a token picks
            its ``topk_group`` best groups (by the sum of each group's two best scores) and
            chooses its k experts inside them. 1 / 1: no limit.
        routed_scaling_factor: multiplies the routed experts' weights (DeepSeek-V3: 2.5).
        min_capacity: floor of the per-expert capacity when dropping (DeepSpeed: 4).
        renormalize_after_drop: renormalise over the kept choices only (DeepSpeed) instead of
            over all k before dropping (GShard, lina's default).
        balance_first_choice_only: the balance loss counts first choices only (DeepSpeed top-2).
    """

    score: str = "softmax"
    norm_topk_prob: bool | None = None
    correction_bias: bool = False
    bias_update_rate: float = 0.0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    min_capacity: int = 1
    renormalize_after_drop: bool = False
    balance_first_choice_only: bool = False

    def validate(self, num_experts: int, top_k: int) -> None:
        """Raise ValueError naming the field and the fix."""
        if self.score not in SCORES:
            raise ValueError(f"router score {self.score!r} is unknown; use one of {', '.join(SCORES)}")
        if self.n_group < 1 or num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide the {num_experts} experts; use a divisor of it")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}")
        if top_k > self.topk_group * (num_experts // self.n_group):
            raise ValueError(
                f"top_k={top_k} exceeds the {self.topk_group * (num_experts // self.n_group)} experts "
                "of the chosen groups; raise topk_group or lower top_k"
            )
        if self.min_capacity < 1:
            raise ValueError(f"min_capacity={self.min_capacity} must be >= 1")
        if self.bias_update_rate < 0 or (self.bias_update_rate > 0 and not self.correction_bias):
            raise ValueError("bias_update_rate must be >= 0 and needs correction_bias=True")


@dataclass(frozen=True)
class ExpertSpec:
    """The routed experts' FFN.

    Attributes:
        activation: ``"gelu"`` (``w1 [E_l, d, f]``, ``b1``, ``w2 [E_l, f, d]``, ``b2``; lina's
            default) or ``"swiglu"`` (``w1 [E_l, d, 2f]`` = gate then up, ``w2 [E_l, f, d]``,
            no bias: ``(silu(x w_gate) * x w_up) w_down``).
        grouped_mm: compute all local experts with one grouped matrix multiply per weight
            (``torch.nn.functional.grouped_mm``) where the device and dtype support it, else one
            matmul per expert (False: always one per expert, lina's default).
    """

    activation: str = "gelu"
    grouped_mm: bool = False

    def validate(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"expert activation {self.activation!r} is unknown; use one of {', '.join(ACTIVATIONS)}")


@dataclass(frozen=True)
class SharedExpertSpec:
    """Dense SwiGLU FFNs every token goes through beside the routed experts (data-parallel
    parameters, like attention).

    Attributes:
        d_ff: hidden width of the shared FFN (DeepSeek: ``moe_intermediate_size *
            n_shared_experts``; Qwen2-MoE: ``shared_expert_intermediate_size``); 0 = none.
        gated: scale its output by ``sigmoid(x w_g)``, one scalar per token (Qwen2-MoE).
    """

    d_ff: int = 0
    gated: bool = False


@dataclass(frozen=True)
class MoESpec:
    router: RouterSpec = field(default_factory=RouterSpec)
    expert: ExpertSpec = field(default_factory=ExpertSpec)
    shared: SharedExpertSpec = field(default_factory=SharedExpertSpec)

    def validate(self, num_experts: int, top_k: int) -> None:
        self.router.validate(num_experts, top_k)
        self.expert.validate()
        if self.shared.d_ff < 0:
            raise ValueError(f"shared expert d_ff={self.shared.d_ff} must be >= 0 (0: none)")

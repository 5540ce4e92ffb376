"""A transformers sparse MoE block as a lina :class:`~lina.moe.layer.MoELayer`: its shape and gate
convention read from the model config, and its tensors moved between three namings (the live
block, a checkpoint's per-expert keys, the lina layer's parameters).

Layouts: transformers keeps a block's experts fused (``gate_up_proj [E, 2f, d]``,
``down_proj [E, d, f]``, ``nn.Linear`` orientation); checkpoints hold one tensor per expert and
weight (gate and up ``[f, d]``, down ``[d, f]``); lina's SwiGLU experts hold
``w1 [E_l, d, 2f]`` (gate columns, then up) and ``w2 [E_l, f, d]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lina.hf.errors import HFModelError
from lina.hf.families import Family
from lina.moe.comm_context import ExpertComm
from lina.moe.layer import MoELayer
from lina.moe.spec import ExpertSpec, MoESpec, RouterSpec, SharedExpertSpec


@dataclass(frozen=True)
class BlockShape:
    """What a family's config says about its MoE blocks."""

    d_model: int
    d_ff: int  # routed experts' hidden width
    num_experts: int
    top_k: int
    spec: MoESpec


def block_shape(family: Family, config, grouped_mm: bool = False, bias_update_rate: float = 0.0) -> BlockShape:
    """Read the MoE block shape and gate convention of ``config`` (a transformers config)."""
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise HFModelError(
            f"hidden_act={act!r}: lina's SwiGLU experts use silu. Fix: use a checkpoint with hidden_act='silu'"
        )
    if getattr(config, "router_jitter_noise", 0.0):
        raise HFModelError(
            f"router_jitter_noise={config.router_jitter_noise}: lina's MoE layer has no input jitter, so training "
            "would differ from the model's. Fix: set config.router_jitter_noise = 0 (its default)"
        )
    num_experts = int(getattr(config, "num_experts", None) or config.num_local_experts)
    top_k = int(config.num_experts_per_tok)
    expert = ExpertSpec(activation="swiglu", grouped_mm=grouped_mm)
    shared = SharedExpertSpec()
    t = family.model_type
    if t == "mixtral":
        router, d_ff = RouterSpec(norm_topk_prob=True), config.intermediate_size
    elif t in ("qwen2_moe", "qwen3_moe"):
        router, d_ff = RouterSpec(norm_topk_prob=bool(config.norm_topk_prob)), config.moe_intermediate_size
        if t == "qwen2_moe":
            shared = SharedExpertSpec(d_ff=config.shared_expert_intermediate_size, gated=True)
    elif t == "olmoe":
        router, d_ff = RouterSpec(norm_topk_prob=bool(config.norm_topk_prob)), config.intermediate_size
    elif t == "deepseek_v3":
        router = RouterSpec(
            score="sigmoid",
            norm_topk_prob=bool(config.norm_topk_prob),
            correction_bias=True,
            bias_update_rate=bias_update_rate,
            n_group=int(config.n_group or 1),
            topk_group=int(config.topk_group or 1),
            routed_scaling_factor=float(config.routed_scaling_factor),
        )
        d_ff = config.moe_intermediate_size
        if config.n_shared_experts:
            shared = SharedExpertSpec(d_ff=config.moe_intermediate_size * config.n_shared_experts)
    else:  # pragma: no cover - FAMILIES and this function list the same types
        raise HFModelError(f"no MoE block description for {t!r}")
    return BlockShape(config.hidden_size, int(d_ff), num_experts, top_k, MoESpec(router, expert, shared))


def new_layer(shape: BlockShape, comm: ExpertComm | None, balance_loss_weight: float = 0.0) -> MoELayer:
    """An empty (uninitialised experts, dropless) lina layer of ``shape`` holding this rank's experts."""
    ep = comm.size if comm is not None else 1
    if shape.num_experts % ep:
        raise HFModelError(
            f"{shape.num_experts} experts cannot be split evenly over an expert-parallel group of {ep} ranks. "
            f"Fix: use an EP size that divides {shape.num_experts}"
        )
    return MoELayer(
        shape.d_model,
        shape.d_ff,
        shape.num_experts,
        shape.top_k,
        dropless=True,
        balance_loss_weight=balance_loss_weight,
        comm=comm,
        spec=shape.spec,
        init_experts=False,
    )


def _swiglu_w1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [..., f, d] (nn.Linear weights) -> [..., d, 2f]."""
    return torch.cat([gate, up], dim=-2).transpose(-1, -2).contiguous()


def state_from_block(block: nn.Module, family: Family, ids: list[int]) -> dict[str, torch.Tensor]:
    """The lina layer's state dict for experts ``ids``, taken from a live transformers block."""
    experts = block.experts
    if not hasattr(experts, "gate_up_proj"):
        raise HFModelError(
            f"{type(block).__name__} keeps its experts as {type(experts).__name__} without fused "
            "gate_up_proj / down_proj weights, a layout this transformers version does not have. "
            "Fix: install transformers>=5 (pip install 'lina[hf]')"
        )
    idx = torch.tensor(ids, dtype=torch.long)
    state = {
        "router.gate.weight": block.gate.weight.detach(),
        "experts.w1": experts.gate_up_proj.detach()
        .index_select(0, idx.to(experts.gate_up_proj.device))
        .transpose(1, 2),
        "experts.w2": experts.down_proj.detach().index_select(0, idx.to(experts.down_proj.device)).transpose(1, 2),
    }
    if hasattr(block.gate, "e_score_correction_bias"):
        state["router.correction_bias"] = block.gate.e_score_correction_bias.detach()
    shared = getattr(block, family.shared_key, None) if family.shared_key else None
    if shared is not None:
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[f"shared.{name}.weight"] = getattr(shared, name).weight.detach()
    if family.shared_gate_key:
        state["shared.gate.weight"] = getattr(block, family.shared_gate_key).weight.detach()
    return {k: v.contiguous() for k, v in state.items()}


def checkpoint_keys(
    family: Family, layer: int, num_experts: int, block_key: str | None = None
) -> dict[str, list[str] | str]:
    """Checkpoint key(s) of each lina parameter of MoE block ``layer`` (per-expert layout):
    ``experts.w1`` -> gate keys then up keys (E each), ``experts.w2`` -> down keys.
    ``block_key`` overrides the family's name of the block (fused checkpoints use ``mlp``)."""
    p = f"model.layers.{layer}.{block_key or family.block_key}."
    gate, up, down = family.expert_keys
    keys: dict[str, list[str] | str] = {
        "router.gate.weight": p + "gate.weight",
        "experts.w1": [p + f"experts.{e}.{gate}.weight" for e in range(num_experts)]
        + [p + f"experts.{e}.{up}.weight" for e in range(num_experts)],
        "experts.w2": [p + f"experts.{e}.{down}.weight" for e in range(num_experts)],
    }
    if family.model_type == "deepseek_v3":
        keys["router.correction_bias"] = p + "gate.e_score_correction_bias"
    if family.shared_key:
        for name in ("gate_proj", "up_proj", "down_proj"):
            keys[f"shared.{name}.weight"] = p + f"{family.shared_key}.{name}.weight"
    if family.shared_gate_key:
        keys["shared.gate.weight"] = p + f"{family.shared_gate_key}.weight"
    return keys


def fused_keys(family: Family, layer: int) -> tuple[str, str]:
    """Keys of a checkpoint that stores a block's experts fused (as transformers holds them)."""
    p = f"model.layers.{layer}.mlp.experts."
    return p + "gate_up_proj", p + "down_proj"


def state_from_checkpoint(
    reader, family: Family, layer: int, num_experts: int, ids: list[int]
) -> dict[str, torch.Tensor]:
    """The lina layer's state dict for experts ``ids`` of MoE block ``layer``, reading only those
    experts' tensors from ``reader`` (a :class:`lina.hf.checkpoint.CheckpointReader`)."""
    fused_gate_up, fused_down = fused_keys(family, layer)
    fused = reader.has(fused_gate_up)
    keys = checkpoint_keys(family, layer, num_experts, block_key="mlp" if fused else None)
    state = {}
    for name, key in keys.items():
        if name.startswith("experts."):
            continue
        state[name] = reader.get(key)
    if fused:
        state["experts.w1"] = reader.get_rows(fused_gate_up, ids).transpose(1, 2).contiguous()
        state["experts.w2"] = reader.get_rows(fused_down, ids).transpose(1, 2).contiguous()
        return state
    gate_keys, up_keys = keys["experts.w1"][:num_experts], keys["experts.w1"][num_experts:]
    state["experts.w1"] = torch.stack([_swiglu_w1(reader.get(gate_keys[e]), reader.get(up_keys[e])) for e in ids])
    state["experts.w2"] = torch.stack([reader.get(keys["experts.w2"][e]).t().contiguous() for e in ids])
    return state


def checkpoint_tensors(
    state: dict[str, torch.Tensor], family: Family, layer: int, num_experts: int
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`state_from_checkpoint` for a layer state holding *every* expert
    (``experts.w1 [E, d, 2f]``, ``experts.w2 [E, f, d]``) -> checkpoint key -> tensor."""
    keys = checkpoint_keys(family, layer, num_experts)
    out = {}
    for name, key in keys.items():
        if not name.startswith("experts."):
            out[key] = state[name]
    w1, w2 = state["experts.w1"], state["experts.w2"]
    f = w2.shape[1]
    for e in range(num_experts):
        out[keys["experts.w1"][e]] = w1[e, :, :f].t().contiguous()
        out[keys["experts.w1"][num_experts + e]] = w1[e, :, f:].t().contiguous()
        out[keys["experts.w2"][e]] = w2[e].t().contiguous()
    return out

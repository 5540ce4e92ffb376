"""A rank's training state as layout-free, flat named tensors (what a checkpoint holds).

Keys do not depend on the worker count or the expert layout:

* ``model/<name>``: dense parameters and buffers (identical on every rank; saved once);
* ``experts/<layer>/<expert id>/<w1|b1|w2|b2>`` (SwiGLU: ``<w1|w2>``): one expert's weights, by global id (every
  replica of an expert holds the same values; saved once);
* ``optim/<name>/<exp_avg|exp_avg_sq|step>`` and ``optim-experts/<layer>/<id>/<param>/<...>``:
  AdamW's state, keyed like the parameters;
* ``rng/<rank>``: the rank's CPU random-number-generator state (ByteTensor).

A rank saves the keys of the experts it holds; loading asks for the keys of the experts the new
layout gives it, so any layout reads any other's checkpoint (the experts are resharded by id).
Shapes: ``w1 [d_model, d_ff]``, ``b1 [d_ff]``, ``w2 [d_ff, d_model]``, ``b2 [d_model]`` per expert.
"""

from __future__ import annotations

import torch
from torch import nn

from lina.errors import LinaError

ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


def _expert_params(model: nn.Module) -> list[tuple[int, str, nn.Parameter, list[int]]]:
    """``(MoE layer index, parameter name, stacked parameter [E_l, ...], global ids)``."""
    out = []
    for li, layer in enumerate(model.moe_layers()):
        for name in layer.experts.param_names:  # w1, b1, w2, b2 (GELU) or w1, w2 (SwiGLU)
            out.append((li, name, getattr(layer.experts, name), list(layer.experts.global_ids)))
    return out


def _dense_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    expert_ids = {id(p) for _, _, p, _ in _expert_params(model)}
    expert_names = {n for n, p in model.named_parameters() if id(p) in expert_ids}
    return {n: t for n, t in model.state_dict(keep_vars=True).items() if n not in expert_names}


def flat_state(model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> dict[str, torch.Tensor]:
    """This rank's state as flat named CPU tensors (copies; see the module docstring for keys)."""
    out: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())
    for name, t in _dense_entries(model).items():
        out[f"model/{name}"] = t.detach().to("cpu", copy=True)
        p = params.get(name)
        if p is not None:
            for key, value in _adam_state(optimizer, p, name).items():
                out[f"optim/{name}/{key}"] = value.detach().to("cpu", copy=True)
    for li, pname, p, ids in _expert_params(model):
        state = _adam_state(optimizer, p, f"experts of MoE layer {li}")
        for i, e in enumerate(ids):
            out[f"experts/{li}/{e}/{pname}"] = p.detach()[i].to("cpu", copy=True)
            for key, value in state.items():
                own = value if key == "step" else value[i]  # one step counter per stacked parameter
                out[f"optim-experts/{li}/{e}/{pname}/{key}"] = own.detach().to("cpu", copy=True)
    out[f"rng/{rank}"] = torch.get_rng_state()
    return out


def _adam_state(optimizer: torch.optim.Optimizer, p: nn.Parameter, what: str) -> dict[str, torch.Tensor]:
    state = optimizer.state.get(p, {})
    if not state:
        return {}
    missing = [k for k in ADAM_KEYS if k not in state]
    if missing:
        raise LinaError(f"the optimizer state of {what} lacks {missing}; lina checkpoints AdamW state only")
    return {k: torch.as_tensor(state[k]) for k in ADAM_KEYS}


def template(model: nn.Module, optimizer_state: bool, rng_key: str | None) -> dict[str, torch.Tensor]:
    """Empty CPU tensors under the keys this rank needs in its current layout (a checkpoint is
    loaded into them): everything :func:`flat_state` would write, AdamW state when
    ``optimizer_state``, and the random state under ``rng_key``."""
    out: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())
    for name, t in _dense_entries(model).items():
        out[f"model/{name}"] = torch.empty(t.shape, dtype=t.dtype)
        if optimizer_state and name in params:
            for key in ADAM_KEYS:
                out[f"optim/{name}/{key}"] = _empty_state(key, t)
    for li, pname, p, ids in _expert_params(model):
        for e in ids:
            out[f"experts/{li}/{e}/{pname}"] = torch.empty(p.shape[1:], dtype=p.dtype)
            if optimizer_state:
                for key in ADAM_KEYS:
                    out[f"optim-experts/{li}/{e}/{pname}/{key}"] = _empty_state(key, p[0])
    if rng_key is not None:
        out[rng_key] = torch.empty_like(torch.get_rng_state())
    return out


def _empty_state(key: str, like: torch.Tensor) -> torch.Tensor:
    return torch.empty((), dtype=torch.float32) if key == "step" else torch.empty(like.shape, dtype=like.dtype)


@torch.no_grad()
def apply_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, loaded: dict[str, torch.Tensor], rng_key: str | None
) -> None:
    """Copy a loaded :func:`template` into the model's parameters and buffers, AdamW's state
    (created when absent; skipped without an optimizer) and the CPU random state (when
    ``rng_key`` is given)."""
    params = dict(model.named_parameters())
    for name, t in _dense_entries(model).items():
        t.copy_(loaded[f"model/{name}"])
        p = params.get(name)
        if p is not None and optimizer is not None and f"optim/{name}/step" in loaded:
            optimizer.state[p] = {k: _state_value(k, loaded[f"optim/{name}/{k}"], p) for k in ADAM_KEYS}
    for li, pname, p, ids in _expert_params(model):
        for i, e in enumerate(ids):
            p[i].copy_(loaded[f"experts/{li}/{e}/{pname}"])
        if optimizer is not None and f"optim-experts/{li}/{ids[0]}/{pname}/step" in loaded:
            steps = {float(loaded[f"optim-experts/{li}/{e}/{pname}/step"]) for e in ids}
            if len(steps) > 1:
                raise LinaError(
                    f"experts {ids} of MoE layer {li} were saved at different AdamW steps {sorted(steps)}; "
                    "they cannot share one parameter"
                )
            state = {
                k: torch.stack([loaded[f"optim-experts/{li}/{e}/{pname}/{k}"] for e in ids]).to(p.device)
                for k in ("exp_avg", "exp_avg_sq")
            }
            state["step"] = loaded[f"optim-experts/{li}/{ids[0]}/{pname}/step"].clone()
            optimizer.state[p] = state
    if rng_key is not None:
        torch.set_rng_state(loaded[rng_key])


def _state_value(key: str, value: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
    return value.clone() if key == "step" else value.to(p.device, copy=True)

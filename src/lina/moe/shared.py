"""Shared experts: a dense SwiGLU FFN every token goes through beside the routed experts
(DeepSeek's ``n_shared_experts``, Qwen2-MoE's gated shared expert). Its parameters are ordinary
data-parallel parameters, like attention's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lina.moe.spec import SharedExpertSpec


class SharedExperts(nn.Module):
    """``x [T, d_model] -> [T, d_model]``: ``down(silu(gate_proj x) * up_proj x)``, scaled per
    token by ``sigmoid(gate x)`` when ``spec.gated``. Layout as in Hugging Face checkpoints:
    ``gate_proj.weight [d_ff, d_model]``, ``up_proj.weight [d_ff, d_model]``,
    ``down_proj.weight [d_model, d_ff]``, ``gate.weight [1, d_model]``."""

    def __init__(self, d_model: int, spec: SharedExpertSpec):
        super().__init__()
        self.spec = spec
        self.gate_proj = nn.Linear(d_model, spec.d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, spec.d_ff, bias=False)
        self.down_proj = nn.Linear(spec.d_ff, d_model, bias=False)
        self.gate = nn.Linear(d_model, 1, bias=False) if spec.gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x)) * y
        return y

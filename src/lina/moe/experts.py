"""The local experts of one rank: E_l two-layer FFNs, computed group by group (one matmul pair per
expert over all its rows, never a loop over tokens)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LocalExperts(nn.Module):
    """E_l expert FFNs ``d_model -> d_ff -> d_model`` with GELU.

    Parameters are marked ``param.lina_expert = True`` so that data-parallel gradient sync of
    non-expert parameters skips them. ``global_ids`` are the experts' ids in the whole model.
    """

    def __init__(self, num_local: int, d_model: int, d_ff: int, global_ids: list[int]):
        super().__init__()
        self.num_local = num_local
        self.global_ids = list(global_ids)
        self.w1 = nn.Parameter(torch.empty(num_local, d_model, d_ff))
        self.b1 = nn.Parameter(torch.zeros(num_local, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_local, d_ff, d_model))
        self.b2 = nn.Parameter(torch.zeros(num_local, d_model))
        for p in self.parameters():
            p.lina_expert = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert's weights come from its own generator seeded by (layer seed, global id), so
        expert e starts the same wherever it is placed; the layer seed is drawn from the global RNG
        the same way on every rank, so non-expert initialisation is identical on all ranks."""
        layer_seed = int(torch.randint(2**31 - 1, ()))
        d_model, d_ff = self.w1.shape[1], self.w1.shape[2]
        with torch.no_grad():
            for i, e in enumerate(self.global_ids):
                gen = torch.Generator().manual_seed(layer_seed * 1009 + e)
                self.w1[i].copy_(torch.randn(d_model, d_ff, generator=gen) / math.sqrt(d_model))
                self.w2[i].copy_(torch.randn(d_ff, d_model, generator=gen) / math.sqrt(d_ff))
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def forward(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """rows: FloatTensor[S, d_model] grouped by local expert; counts: rows per local expert
        (len E_l, sums to S) -> FloatTensor[S, d_model]."""
        outs = []
        for e, chunk in enumerate(torch.split(rows, counts)):
            h = F.gelu(torch.addmm(self.b1[e], chunk, self.w1[e]))
            outs.append(torch.addmm(self.b2[e], h, self.w2[e]))
        if not outs:
            return rows
        return torch.cat(outs) if len(outs) > 1 else outs[0]

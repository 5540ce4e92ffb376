"""DeepSpeed's gate with a routing trace's choices, for device-time runs of the DeepSpeed peer.

In a device-time run (:mod:`lina.devicetime`) floating-point values are uninitialised, so a gate
that picks experts from its scores would route arbitrarily (often every token to one expert). lina's
own layers route by a :class:`lina.devicetime.TraceRouting`; :class:`TraceGate` does the same for
DeepSpeed's ``MOELayer``, with DeepSpeed's gate output contract (sparse routes, as its ``MOELayer``
asks for them): the same expert counts, the same capacity rule (dropless: the largest expert load
in the expert-parallel group, found by the same MAX all-reduce DeepSpeed issues; else DeepSpeed's
``ceil(T / E x capacity_factor x k)``, at least ``min_capacity``), and the gate's compute (the score
projection, the softmax, the gathered and renormalised weights) charged as DeepSpeed charges it.
So the peer's all-to-alls move ``E x capacity`` rows as DeepSpeed's would for that routing.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lina.devicetime import TraceRouting
from lina.errors import LinaError


class TraceGate(nn.Module):
    """Replaces a DeepSpeed ``TopKGate`` inside its ``MOELayer``.

    Args:
        gate: DeepSpeed's gate (``wg``, ``k``, ``capacity_factor``, ``min_capacity``,
            ``drop_tokens``, ``ep_group``); its ``wg`` still projects the scores and gets gradients.
        routing: the trace; ``layer`` is this MoE layer's index among the model's MoE layers.
    """

    def __init__(self, gate: nn.Module, routing: TraceRouting, layer: int):
        super().__init__()
        self.inner = gate  # its parameters stay under it, registered once
        self.routing = routing
        self.layer = layer

    def _set_ep_group(self, ep_group) -> None:
        self.inner._set_ep_group(ep_group)

    def forward(self, input: torch.Tensor, used_token=None, sparse_routes: bool = True, use_tutel: bool = False):
        """``input [T, d_model]`` -> ``(aux loss [], capacity [] int64, E, expert ids [k, T] int32 (-1:
        dropped), slots [k, T] int32, weights [k, T], expert counts [E])``."""
        if not sparse_routes or use_tutel:
            raise LinaError(
                "the trace gate serves DeepSpeed's sparse routes (what its MOELayer asks for). "
                "Fix: use a deepspeed version whose MOELayer calls its gate with sparse_routes=True (>= 0.16)"
            )
        g = self.inner
        tokens, k = input.shape[0], g.k
        logits = F.linear(input.float(), g.wg.weight.float())
        gates = F.softmax(logits, dim=1)  # [T, E]
        num_experts = gates.shape[1]
        ids = self.routing.choices(self.layer, tokens, k).to(input.device)  # [T, k]
        flat = ids.reshape(-1)  # routes in token order, choice-minor
        onehot = F.one_hot(flat, num_experts)  # [T*k, E]
        counts = onehot.sum(0)  # [E]
        location = (onehot.cumsum(0) - 1).gather(1, flat[:, None]).view(tokens, k)  # each route's slot
        if g.drop_tokens:
            capacity = torch.tensor(max(int(math.ceil(tokens / num_experts * g.capacity_factor * k)), g.min_capacity))
        else:
            capacity = counts.max().clone()
            if g.ep_group is not None and dist.get_world_size(g.ep_group) > 1:
                dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=g.ep_group)
        kept = location < capacity
        route_ids = torch.where(kept, ids, torch.full_like(ids, -1))
        weights = gates.gather(1, ids)  # [T, k]
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).eps)
        aux = (gates.mean(0) * counts.float() / max(1, tokens * k)).sum() * num_experts
        return (
            aux,
            capacity,
            num_experts,
            route_ids.t().contiguous().to(torch.int32),
            (location * kept).t().contiguous().to(torch.int32),
            weights.t().contiguous(),
            counts,
        )

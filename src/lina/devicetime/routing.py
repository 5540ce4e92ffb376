"""Routing from a recorded trace for device-time runs: each MoE layer's token-to-expert choices
are taken, in order, from a :class:`lina.data.routing_trace.RoutingTrace`, so all-to-all splits are as
uneven as real ones while the gate itself computes nothing meaningful."""

from __future__ import annotations

import torch

from lina.data.routing_trace import load_trace
from lina.errors import ConfigError
from lina.moe.router import Routing


class TraceRouting:
    """Replaces the gate's choices with a trace's.

    Args:
        expert_ids: LongTensor[T, L, k] of the trace (tokens in serving order).
        num_experts: E of the model; a trace of m x E experts is folded onto it (expert e -> e mod E),
            which keeps its unevenness while merging experts.
        offset: first trace token this rank takes (ranks start apart so they route differently).

    MoE layer ``j`` of the model reads trace layer ``j mod L``; each call takes the next T tokens,
    wrapping around the trace.
    """

    def __init__(self, expert_ids: torch.Tensor, num_experts: int, offset: int = 0):
        if expert_ids.dim() != 3:
            raise ConfigError(
                "routing_trace", f"expert ids of shape {tuple(expert_ids.shape)}", "give a [tokens, layers, k] trace"
            )
        trace_experts = int(expert_ids.max()) + 1
        if trace_experts > num_experts:
            if trace_experts % num_experts:
                raise ConfigError(
                    "routing_trace",
                    f"the trace routes to {trace_experts} experts, the model has {num_experts}",
                    "record the trace from a model with the same expert count (or a multiple of it)",
                )
            expert_ids = expert_ids % num_experts  # m x E experts folded onto E: expert e takes e mod E's tokens
        self.expert_ids = expert_ids.long()
        self.num_experts = num_experts
        self.cursor: dict[int, int] = {}
        self.offset = offset

    @classmethod
    def from_file(cls, path: str, num_experts: int, offset: int = 0) -> "TraceRouting":
        """From a trace file (``.npz`` of ``lina infer --record-trace``, or a Mixtral ``.jsonl``)."""
        return cls.from_trace(load_trace(path), num_experts, offset)

    @classmethod
    def from_trace(cls, trace, num_experts: int, offset: int = 0) -> "TraceRouting":
        """From a :class:`lina.data.routing_trace.RoutingTrace`."""
        return cls(trace.in_order().expert_tensor(), num_experts, offset)

    def choices(self, layer: int, num_tokens: int, top_k: int) -> torch.Tensor:
        """LongTensor[num_tokens, top_k]: the next tokens' experts at ``layer``."""
        total, layers, k = self.expert_ids.shape
        if top_k > k:
            raise ConfigError(
                "routing_trace",
                f"the trace has top-{k} choices, the model takes top-{top_k}",
                "record the trace at the model's top-k",
            )
        start = self.cursor.get(layer, self.offset)
        index = (torch.arange(num_tokens) + start) % total
        self.cursor[layer] = (start + num_tokens) % total
        return self.expert_ids[index, layer % layers, :top_k]

    def apply(self, layer: int, routing: Routing) -> Routing:
        """``routing`` with the trace's choices (dropless: every slot kept); the weights keep the
        gate's graph, so its parameters still get gradients and their allreduce."""
        t, k = routing.expert_ids.shape
        ids = self.choices(layer, t, k)
        return Routing(ids, routing.weights, torch.ones_like(routing.kept), routing.aux_loss, routing.probs)

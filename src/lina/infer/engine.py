"""Expert-parallel inference over N workers with a pluggable placement policy.

Per MoE layer of a batch (every worker runs the same sequence of collectives, so a worker that
receives no token still takes part):

1. gate (the model's router, or a recorded trace) -> expert ids [T, k] and weights [T, k];
2. the policy's placement of this layer (lina: phase 2 check against the real counts);
3. dispatch: one small all-to-all of per-(device, expert) counts, which also carries each
   worker's phase-1 estimate of the NEXT layer's popularity to the coordinator (rank 0) and, on
   the first layer for a policy that learns from step latency (``lina-auto``), each worker's time
   for the previous batch; then the rows themselves, to the replica each token-slot was routed to;
4. each worker computes the experts it holds for this layer (weights loaded in the background
   once the plan is known) and the coordinator plans the next layer from the summed estimates;
5. combine: results return to their tokens; the coordinator's plan of the next layer rides on it
   (a few extra rows from rank 0 to everybody), so phase 1 costs no extra round trip.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from lina.infer.policies import ServingPolicy, local_counts
from lina.infer.store import ExpertStore, expert_ffn
from lina.moe.permute import inverse_permutation, source_to_expert_major
from lina.obs import schema
from lina.obs.timeline import Timeline
from lina.placement.core import Placement

COORDINATOR = 0


@dataclass
class LayerRouting:
    """Gate decision of one MoE layer for the local tokens: ids LongTensor[T, k], weights [T, k]."""

    expert_ids: torch.Tensor
    weights: torch.Tensor


@dataclass
class BatchStats:
    """Figures of one batch on one rank, read off its spans (see ``_fill_stats``)."""

    latency_s: float = 0.0
    layer_a2a_s: list[float] = field(default_factory=list)  # dispatch + combine per MoE layer
    phase1_s: float = 0.0  # coordinator planning time (rank 0)
    phase2_s: list[float] = field(
        default_factory=list
    )  # per layer: the placement decision (lina: top-2k check, re-plan)
    max_device_rows: list[int] = field(default_factory=list)


def replica_rows(counts_by_source: torch.Tensor, placement: Placement) -> torch.Tensor:
    """How many of each source's token-slots of each expert go to each device.

    Mirrors :meth:`Placement.route`: a source's c slots of expert e are split among e's replicas
    at ``round(cumulative share * c)``, so a receiver computes what it gets from the counts alone.

    Args:
        counts_by_source: Tensor[S, E] token-slots per expert of each source device.
    Returns:
        LongTensor[S, E, N].
    """
    cum = torch.cumsum(placement.share, dim=1)
    cum[:, -1] = 1.0
    bounds = torch.round(cum[None] * counts_by_source.double()[:, :, None]).long()  # [S, E, N]
    return torch.diff(bounds, dim=2, prepend=torch.zeros_like(bounds[:, :, :1]))


class InferenceEngine:
    """Runs batches through L MoE layers on an EP group.

    Args:
        store: every expert's weights (host memory).
        top_k: k.
        group: the process group of the N workers (None: one process).
        policy: a :class:`lina.infer.policies.ServingPolicy`.
        timeline: spans of this rank; when None, the engine keeps its own and forgets each
            batch's spans once its figures are read (a long serving run stays flat in memory).
        expert_fn: ``expert_fn(rows [n, d], weights) -> [n, d]``, one expert on its rows
            (default :func:`lina.infer.store.expert_ffn`; a benchmark may charge device time).
    """

    def __init__(
        self,
        store: ExpertStore,
        top_k: int,
        group: dist.ProcessGroup | None,
        policy: ServingPolicy,
        timeline: Timeline | None = None,
        expert_fn: Callable[[torch.Tensor, tuple], torch.Tensor] = expert_ffn,
        compute_mode: Callable[[], contextlib.AbstractContextManager] | None = None,
    ):
        self.store = store
        self.expert_fn = expert_fn
        # what the expert FFNs run under: nothing (they compute), or e.g. a device-time mode
        # (lina.devicetime), which charges them a device's time; scheduling always computes
        self.compute_mode = compute_mode or contextlib.nullcontext
        self.top_k = top_k
        self.group = group
        self.world = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self.policy = policy
        self._own_timeline = timeline is None
        self.timeline = timeline or Timeline(self.rank, enabled=True)
        self.num_experts = store.num_experts
        self.last_batch_s = 0.0  # this rank's time for the previous batch (0: none yet)

    # ------------------------------------------------------------------ collectives
    def _a2a(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        if self.group is None:
            out.copy_(x)
            return out
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=self.group)
        return out

    def _plan_rows(self, d: int) -> int:
        return math.ceil((self.num_experts * self.world + self.num_experts) / d)

    # ------------------------------------------------------------------ one MoE layer
    def moe_layer(
        self, layer: int, h: torch.Tensor, routing: LayerRouting, history: torch.Tensor, stats: BatchStats
    ) -> torch.Tensor:
        """h: FloatTensor[T, d] -> FloatTensor[T, d], the weighted sum of the token's experts."""
        tl, e_count, n, k = self.timeline, self.num_experts, self.world, self.top_k
        ids, weights = routing.expert_ids, routing.weights
        t, d = h.shape
        # Phase 1 for the next layer: this device's estimate, sent to the coordinator.
        next_layer = layer + 1
        paths = torch.cat([history, ids[:, :1]], dim=1)  # top-1 experts through this layer
        estimate = (
            self.policy.local_estimate(next_layer, paths)
            if self.policy.uses_phase1 and next_layer < self.store.num_layers
            else None
        )
        carries_plan = estimate is not None
        # Dispatch header: every device's local counts to every device (+ the estimate to the
        # coordinator). From it each device knows the global counts and what it will receive.
        # On the first layer a policy that learns from step latency (lina-auto) also gets this
        # rank's time for the previous batch to every rank, one more column of the header.
        reports_latency = layer == 0 and self.policy.wants_step_latency
        header = torch.zeros(n, 2 * e_count + int(reports_latency), dtype=torch.float64)
        header[:, :e_count] = local_counts(ids, e_count)
        if carries_plan:
            header[COORDINATOR, e_count : 2 * e_count] = estimate
        if reports_latency:
            header[:, 2 * e_count] = self.last_batch_s
        with tl.span(f"moe{layer}.dispatch-header", "a2a", kind=schema.DISPATCH_HEADER, layer=layer, phase="fwd"):
            recv_header = self._a2a(header, [1] * n, [1] * n)
        counts_by_source = recv_header[:, :e_count]  # [sources, E]
        if reports_latency and self.last_batch_s > 0:  # the previous batch ended with its slowest rank
            self.policy.observe_step_latency(float(recv_header[:, 2 * e_count].max()))
        with tl.span(f"moe{layer}.phase2", "sched", kind=schema.PLACEMENT, layer=layer):
            placement = self.policy.placement(layer, counts_by_source.sum(0))  # lina: phase 2
        self.layer_counts.append(counts_by_source.sum(0))
        # Route every token-slot to a replica and order slots by (device, expert).
        device = placement.route(ids)  # [T, k]
        key = (device * e_count + ids).reshape(-1)
        order = torch.argsort(key, stable=True)
        send_counts = torch.bincount(key, minlength=n * e_count).view(n, e_count)
        recv_counts = replica_rows(counts_by_source, placement)[:, :, self.rank]  # [sources, E]
        rows = h[order // k]
        in_splits = send_counts.sum(1).tolist()
        out_splits = recv_counts.sum(1).tolist()
        nbytes = rows.numel() * rows.element_size()
        with tl.span(f"moe{layer}.dispatch", "a2a", kind=schema.DISPATCH, layer=layer, phase="fwd", bytes=nbytes):
            received = self._a2a(rows, out_splits, in_splits)
        stats.max_device_rows.append(int(recv_counts.sum()))
        # Experts this device computes for this layer.
        index = source_to_expert_major(recv_counts)
        grouped = received[index]
        per_expert = recv_counts.sum(0).tolist()
        with tl.span(f"moe{layer}.experts", "compute", kind=schema.EXPERT, layer=layer, phase="fwd"):
            weights_by_expert = self.store.load(layer, placement.device_experts(self.rank).tolist())
            with self.compute_mode():
                outs = [
                    self.expert_fn(chunk, weights_by_expert[e])
                    for e, chunk in zip(range(e_count), torch.split(grouped, per_expert))
                    if chunk.shape[0]
                ]
                computed = torch.cat(outs) if outs else grouped
        back = computed[inverse_permutation(index)]
        # Coordinator: plan the next layer while the combine is being assembled.
        plan_rows = self._plan_rows(d) if carries_plan else 0
        if carries_plan and self.rank == COORDINATOR:
            with tl.span(f"moe{next_layer}.phase1", "sched", kind=schema.PLAN_ESTIMATE, layer=next_layer):
                est_sum = recv_header[:, e_count : 2 * e_count].sum(0)
                plan = self.policy.coordinate(next_layer, est_sum)
                payload = torch.cat([plan.share.float().reshape(-1), est_sum.float()])
                payload = torch.nn.functional.pad(payload, (0, plan_rows * d - payload.numel())).view(plan_rows, d)
            pieces, splits_back = [], []
            for src in range(n):
                block = back[sum(out_splits[:src]) : sum(out_splits[: src + 1])]
                pieces += [block, payload]
                splits_back.append(out_splits[src] + plan_rows)
            back = torch.cat(pieces)
        else:
            splits_back = out_splits
        recv_back = [c + (plan_rows if src == COORDINATOR else 0) for src, c in enumerate(in_splits)]
        nbytes = back.numel() * back.element_size()
        with tl.span(f"moe{layer}.combine", "a2a", kind=schema.COMBINE, layer=layer, phase="fwd", bytes=nbytes):
            returned = self._a2a(back, recv_back, splits_back)
        if carries_plan:
            payload = returned[in_splits[COORDINATOR] : in_splits[COORDINATOR] + plan_rows].reshape(-1)
            share = payload[: e_count * n].double().view(e_count, n)
            est_global = payload[e_count * n : e_count * n + e_count].double()
            plan = Placement(e_count, n, share)
            self.policy.receive_plan(next_layer, plan, est_global)
            self.store.prefetch(next_layer, plan.device_experts(self.rank).tolist())
            returned = torch.cat([returned[: in_splits[COORDINATOR]], returned[in_splits[COORDINATOR] + plan_rows :]])
        w = weights.reshape(-1)[order].unsqueeze(-1).to(returned.dtype)
        out = h.new_zeros((t, d))
        return out.index_add(0, order // k, returned * w)

    def _fill_stats(self, stats: BatchStats, spans: list, start: float, end: float) -> None:
        """Batch figures, all read off this batch's spans on the one timeline."""
        stats.latency_s = end - start
        for layer in range(self.store.num_layers):
            stats.layer_a2a_s.append(sum(s.dur_s for s in spans if s.cat == "a2a" and s.layer == layer))
            stats.phase2_s.append(sum(s.dur_s for s in spans if s.kind == schema.PLACEMENT and s.layer == layer))
        stats.phase1_s = sum(s.dur_s for s in spans if s.kind == schema.PLAN_ESTIMATE)

    # ------------------------------------------------------------------ a batch
    def run_batch(
        self,
        h: torch.Tensor,
        dense: Callable[[int, torch.Tensor], torch.Tensor],
        gate: Callable[[int, torch.Tensor], LayerRouting],
        free_counts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, BatchStats]:
        """Run all layers.

        Args:
            h: FloatTensor[T, d] hidden states of this worker's tokens.
            dense: ``dense(layer, h) -> (h, moe_input)``: the layer's non-expert part; returns the
                residual stream [T, d] and the MoE input [T, d] (e.g. after attention and norm).
            gate: ``gate(layer, moe_input) -> LayerRouting``.
            free_counts: FloatTensor[L, E] real global counts (trace replay), for the oracle.
        Returns:
            (h after the last layer [T, d], stats)
        """
        stats = BatchStats()
        self.policy.begin_batch(free_counts)
        tl = self.timeline
        start = tl.now()
        history = torch.zeros(h.shape[0], 0, dtype=torch.long)
        self.layer_counts: list[torch.Tensor] = []
        # this batch's gate decisions per layer (read by whoever learns from or records them)
        self.layer_routing: list[LayerRouting] = []
        for layer in range(self.store.num_layers):
            h, moe_in = dense(layer, h)
            routing = gate(layer, moe_in)
            self.layer_routing.append(routing)
            h = h + self.moe_layer(layer, moe_in, routing, history, stats)
            history = torch.cat([history, routing.expert_ids[:, :1]], dim=1)
        if self.policy.forecast_due():  # e.g. lina-window-predict at a window's end: one small allreduce
            routing_ids = torch.stack([r.expert_ids for r in self.layer_routing], dim=1)  # [T, L, k]
            forecast = self.policy.local_forecast(routing_ids).double()
            if self.group is not None:
                dist.all_reduce(forecast, group=self.group)
            self.policy.receive_forecast(forecast)
        if self.policy.needs_batch_counts:
            self.policy.end_batch(torch.stack(self.layer_counts))
        upcoming = self.policy.upcoming_residents()
        if upcoming is not None:  # the next window's experts move in the background, before they serve
            for layer, plan in enumerate(upcoming):
                self.store.make_resident(layer, plan.device_experts(self.rank).tolist())
        self.store.forget()
        end = tl.now()
        self.last_batch_s = end - start  # reported to every rank with the next batch's first header
        tl.record("batch", "step", start, end, kind=schema.BATCH, policy=self.policy.name)
        self._fill_stats(stats, tl.spans(since_s=start), start, end)
        if self._own_timeline:
            tl.clear()  # this batch's figures are read; nothing reads its spans again
        return h, stats

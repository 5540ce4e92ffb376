"""Replay a routing trace through the serving policies (:mod:`lina.infer.policies`) and measure how
evenly each spreads the real token-slots over devices.

The trace is served in order, in batches of ``batch_tokens`` consecutive tokens; every policy
object plans each scored layer exactly as the engine drives it (``begin_batch``, Lina's phase 1
``local_estimate`` / ``coordinate`` / ``receive_plan``, then ``placement`` on the real counts,
``end_batch``), here with one device holding the whole batch. An online estimator learns each
layer's real choices right after the layer was planned, as it would while serving.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch

from lina.data.routing_trace import RoutingTrace
from lina.infer.policies import LinaPolicy, ServingContext, ServingPolicy, serving_policy
from lina.placement.core import imbalance
from lina.placement.estimators.base import PopularityEstimator
from lina.placement.estimators.online import OnlinePathEstimator
from lina.placement.evaluate import batches_of

#: report name -> Lina's popularity mode (``lina`` is the paper's top-k mass, ``lina-expected`` ours)
LINA_VARIANTS = {"lina": "topk", "lina-expected": "expected"}
POLICIES = ("static", "eplb", "lina-phase1", "lina", "lina-expected-phase1", "lina-expected", "oracle")


@dataclass
class BalanceReport:
    """Busiest-device load over mean device load (1.0 = balanced), per policy, over (batch, layer).

    ``mean`` / ``p95`` / ``max`` per policy name (``lina*-phase1``: the phase-1 plan before phase 2
    checked it); ``replan_rate`` per Lina variant: share of (batch, layer) where phase 2 re-planned.
    """

    num_devices: int
    mean: dict[str, float] = field(default_factory=dict)
    p95: dict[str, float] = field(default_factory=dict)
    max: dict[str, float] = field(default_factory=dict)
    replan_rate: dict[str, float] = field(default_factory=dict)
    samples: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _slot_counts(chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """LongTensor[T, k] -> float64 Tensor[E]."""
    return torch.bincount(chosen.reshape(-1), minlength=num_experts).double()


def _plan_layer(policy: ServingPolicy, layer: int, history: torch.Tensor, counts: torch.Tensor):
    """One layer of one batch, as the engine drives ``policy``: phase 1 where it has one, then the
    placement on the real counts ``Tensor[E]``."""
    if policy.uses_phase1:
        estimate = policy.local_estimate(layer, history)
        if estimate is not None:
            policy.receive_plan(layer, policy.coordinate(layer, estimate), estimate)
    return policy.placement(layer, counts)


def placement_balance(
    estimator: PopularityEstimator,
    trace: RoutingTrace,
    num_devices: int,
    layers: list[int],
    batch_tokens: int = 16,
    max_experts_per_device: int = 4,
    eplb_window: int = 8,
    eplb_replan_every: int = 4,
) -> BalanceReport:
    """Replay ``trace`` through ``static``, ``eplb``, ``lina`` (both popularity modes) and
    ``oracle`` and compare how evenly each spreads the real token-slots of ``layers``.

    Args:
        estimator: fitted on other routing; an :class:`OnlinePathEstimator` keeps learning.
        trace: the held-out routing, ``[T, L, k]`` expert ids in serving order.
        num_devices: N; layers: the layers scored; batch_tokens: tokens per batch.
    """
    experts = trace.in_order().expert_tensor()  # [T, L, k]
    k, num_experts, num_layers = trace.top_k, trace.num_experts, experts.shape[1]
    base = ServingContext(
        num_experts,
        num_devices,
        k,
        num_layers,
        estimator,
        eplb_window=eplb_window,
        eplb_replan_every=eplb_replan_every,
        max_experts_per_device=max_experts_per_device,
    )
    policies: dict[str, ServingPolicy] = {name: serving_policy(name, base) for name in ("static", "eplb", "oracle")}
    for name, mode in LINA_VARIANTS.items():
        policies[name] = LinaPolicy.create(replace(base, popularity_mode=mode))
    values: dict[str, list[float]] = {p: [] for p in POLICIES}
    for span in batches_of(experts.shape[0], batch_tokens):
        batch = experts[span]
        counts = torch.stack([_slot_counts(batch[:, j], num_experts) for j in range(num_layers)])  # [L, E]
        for policy in policies.values():
            policy.begin_batch(counts)
        for j in layers:
            for name, policy in policies.items():
                placement = _plan_layer(policy, j, batch[:, :j], counts[j])
                values[name].append(imbalance(placement, counts[j]))
                if name in LINA_VARIANTS:
                    phase1 = policy.last_phase1 if policy.last_phase1 is not None else placement
                    values[f"{name}-phase1"].append(imbalance(phase1, counts[j]))
            if isinstance(estimator, OnlinePathEstimator):
                estimator.update(j, batch[:, :j], batch[:, j])
        for policy in policies.values():
            if policy.needs_batch_counts:
                policy.end_batch(counts)
    report = BalanceReport(num_devices=num_devices, samples=len(values["static"]))
    for name, vals in values.items():
        t = torch.tensor(vals, dtype=torch.float64)
        report.mean[name] = float(t.mean())
        report.p95[name] = float(torch.quantile(t, 0.95))
        report.max[name] = float(t.max())
    report.replan_rate = {name: policies[name].stats["replans"] / max(report.samples, 1) for name in LINA_VARIANTS}
    return report


@dataclass
class PolicyReplay:
    """One policy replayed over a trace: the busiest-device load over the mean (1.0 = balanced)
    of each (batch, scored layer) for its final placement and for its phase-1 plan (the final
    one where it has no phase 1), and its per-layer :meth:`ServingPolicy.source_report`."""

    imbalance: list[float]
    phase1_imbalance: list[float]
    sources: list[dict[str, int]]


def replay_policy(
    policy: ServingPolicy, experts: torch.Tensor, layers: list[int], batch_tokens: int = 16
) -> PolicyReplay:
    """Serve ``experts`` LongTensor[T, L, k] (a trace's choices, in order) through ``policy`` in
    batches of ``batch_tokens`` tokens, as the engine drives it, scoring ``layers``."""
    num_experts, num_layers = policy.num_experts, experts.shape[1]
    out = PolicyReplay([], [], [])
    for span in batches_of(experts.shape[0], batch_tokens):
        batch = experts[span]
        counts = torch.stack([_slot_counts(batch[:, j], num_experts) for j in range(num_layers)])  # [L, E]
        policy.begin_batch(counts)
        for j in range(num_layers):
            placement = _plan_layer(policy, j, batch[:, :j, 0], counts[j])
            if j in layers:
                out.imbalance.append(imbalance(placement, counts[j]))
                phase1 = getattr(policy, "last_phase1", None) or placement
                out.phase1_imbalance.append(imbalance(phase1, counts[j]))
        if policy.forecast_due():
            policy.receive_forecast(policy.local_forecast(batch).double())
        if policy.needs_batch_counts:
            policy.end_batch(counts)
    out.sources = policy.source_report(num_layers)
    return out

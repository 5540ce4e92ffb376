"""Replay a held-out routing trace through an estimator and the placement policies.

The trace is served in order ((sequence, position)), in batches of ``batch_tokens``
consecutive tokens; for every batch and every scored layer ``j`` the estimator sees the
tokens' routing at layers ``< j`` (as the engine would before the gate of ``j``) and is
scored against the real choices at ``j``. An :class:`OnlinePathEstimator` is updated with
the real choices right after it was scored, as it would be while serving.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from lina.data.routing_trace import RoutingTrace
from lina.errors import ConfigError
from lina.placement.core import imbalance
from lina.placement.eplb import EPLBPlanner
from lina.placement.estimators.base import PopularityEstimator
from lina.placement.estimators.online import OnlinePathEstimator
from lina.placement.lina import lina_placement, replan_if_needed
from lina.placement.metrics import token_topk_hits, topset_equal
from lina.placement.static import static_placement


@dataclass
class EstimatorScore:
    """Accuracy of one estimator on one held-out trace.

    ``token_topk``: share of (token, layer) whose estimated top-k set is the real one
    (the paper's accuracy); ``token_top1``: estimated top-1 is the real top-1;
    ``batch_match``: share of (batch, layer) whose estimated 2k most popular experts are
    the real ones (``1 - batch_match`` is phase 2's re-plan rate). ``per_layer_*`` are
    indexed like ``layers``.
    """

    token_topk: float
    token_top1: float
    batch_match: float
    layers: list[int]
    per_layer_topk: list[float]
    per_layer_batch: list[float]
    tokens: int
    batches: int

    def as_dict(self) -> dict:
        return asdict(self)


def batches_of(num_tokens: int, batch_tokens: int) -> list[slice]:
    """Consecutive token ranges of ``batch_tokens`` (the last one may be shorter)."""
    if batch_tokens < 1:
        raise ConfigError("batch_tokens", f"is {batch_tokens}", "give 1 or more tokens per batch")
    return [slice(s, min(s + batch_tokens, num_tokens)) for s in range(0, num_tokens, batch_tokens)]


def _slot_counts(chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.bincount(chosen.reshape(-1), minlength=num_experts).double()


def score_estimator(
    estimator: PopularityEstimator, trace: RoutingTrace, layers: list[int], batch_tokens: int = 16
) -> EstimatorScore:
    """Score ``estimator`` on ``trace`` at ``layers`` (see the module docstring).

    Returns:
        an :class:`EstimatorScore`.
    """
    if not layers:
        raise ConfigError("layers", "is empty", "score at least one layer")
    experts = trace.in_order().expert_tensor()  # [T, L, k]
    k, num_experts = trace.top_k, trace.num_experts
    n_top = min(2 * k, num_experts)
    online = isinstance(estimator, OnlinePathEstimator)
    topk_hits = {j: 0 for j in layers}
    top1_hits = {j: 0 for j in layers}
    batch_hits = {j: 0 for j in layers}
    spans = batches_of(experts.shape[0], batch_tokens)
    for span in spans:
        batch = experts[span]
        for j in layers:
            history, real = batch[:, :j], batch[:, j]
            probs = estimator.predict(j, history)
            topk_hits[j] += int(token_topk_hits(probs, real).sum())
            top1_hits[j] += int((probs.argmax(dim=1) == real[:, 0]).sum())
            est_pop = estimator.popularity(j, history, top_k=k)
            batch_hits[j] += int(topset_equal(est_pop, _slot_counts(real, num_experts), n_top))
            if online:
                estimator.update(j, history, real)
    tokens = experts.shape[0]
    per_topk = [topk_hits[j] / tokens for j in layers]
    per_batch = [batch_hits[j] / len(spans) for j in layers]
    return EstimatorScore(
        token_topk=sum(per_topk) / len(layers),
        token_top1=sum(top1_hits.values()) / (tokens * len(layers)),
        batch_match=sum(per_batch) / len(layers),
        layers=list(layers),
        per_layer_topk=per_topk,
        per_layer_batch=per_batch,
        tokens=tokens,
        batches=len(spans),
    )


@dataclass
class BalanceReport:
    """Busiest-device load over mean device load (1.0 = balanced), per policy, over (batch, layer).

    ``mean`` / ``p95`` / ``max`` per policy name; ``replan_rate`` per Lina variant: share
    of (batch, layer) where phase 2 re-planned.
    """

    num_devices: int
    mean: dict[str, float] = field(default_factory=dict)
    p95: dict[str, float] = field(default_factory=dict)
    max: dict[str, float] = field(default_factory=dict)
    replan_rate: dict[str, float] = field(default_factory=dict)
    samples: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


POLICIES = ("static", "eplb", "lina-phase1", "lina", "lina-expected-phase1", "lina-expected", "oracle")
LINA_VARIANTS = {"lina": "topk", "lina-expected": "expected"}


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
    """Replay ``trace`` and compare how evenly each policy spreads the real token-slots.

    Policies: ``static`` (expert e on device e mod N), ``eplb`` (one
    :class:`EPLBPlanner` per layer fed the real counts after each batch), ``lina-phase1``
    (plan from the paper's estimated popularity, ``mode="topk"``, and keep it), ``lina``
    (phase 1 + phase 2 re-plan on the real counts when the top-2k list is wrong), the same
    two with ``mode="expected"`` popularity (``lina-expected*``, our variant), and
    ``oracle`` (plan on the real counts).
    """
    experts = trace.in_order().expert_tensor()
    k, num_experts = trace.top_k, trace.num_experts
    static = static_placement(num_experts, num_devices)
    planners = {j: EPLBPlanner(num_experts, num_devices, window=eplb_window, replan_every=eplb_replan_every) for j in layers}
    values: dict[str, list[float]] = {p: [] for p in POLICIES}
    replans = {name: 0 for name in LINA_VARIANTS}
    for span in batches_of(experts.shape[0], batch_tokens):
        batch = experts[span]
        for j in layers:
            counts = _slot_counts(batch[:, j], num_experts)
            values["static"].append(imbalance(static, counts))
            values["eplb"].append(imbalance(planners[j].placement, counts))
            for name, mode in LINA_VARIANTS.items():
                est_pop = estimator.popularity(j, batch[:, :j], top_k=k, mode=mode)
                planned = lina_placement(est_pop, num_devices, max_experts_per_device)
                final, replanned = replan_if_needed(planned, est_pop, counts, k, max_experts_per_device)
                replans[name] += int(replanned)
                values[f"{name}-phase1"].append(imbalance(planned, counts))
                values[name].append(imbalance(final, counts))
            values["oracle"].append(imbalance(lina_placement(counts, num_devices, max_experts_per_device), counts))
            planners[j].observe(counts)
            if isinstance(estimator, OnlinePathEstimator):
                estimator.update(j, batch[:, :j], batch[:, j])
    report = BalanceReport(num_devices=num_devices, samples=len(values["static"]))
    for name, vals in values.items():
        t = torch.tensor(vals, dtype=torch.float64)
        report.mean[name] = float(t.mean())
        report.p95[name] = float(torch.quantile(t, 0.95))
        report.max[name] = float(t.max())
    report.replan_rate = {name: n / max(report.samples, 1) for name, n in replans.items()}
    return report

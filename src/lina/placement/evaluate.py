"""Replay a held-out routing trace through an estimator and score its accuracy.

The trace is served in order ((sequence, position)), in batches of ``batch_tokens``
consecutive tokens; for every batch and every scored layer ``j`` the estimator sees the
tokens' routing at layers ``< j`` (as the engine would before the gate of ``j``) and is
scored against the real choices at ``j``. An :class:`OnlinePathEstimator` is updated with
the real choices right after it was scored, as it would be while serving. The serving
policies' balance on the same replay is :func:`lina.infer.replay.placement_balance`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lina.data.routing_trace import RoutingTrace
from lina.errors import ConfigError
from lina.placement.estimators.base import PopularityEstimator
from lina.placement.estimators.online import OnlinePathEstimator
from lina.placement.metrics import token_topk_hits, topset_equal


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

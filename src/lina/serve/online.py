"""The estimator's accuracy over a serving run, and its online learning: after every engine step,
score the estimator's top-k prediction of each token's experts (layers 1..L-1, from the path
through earlier layers) against what the gates chose, then, when it learns online, add the step's
real routing to its tables."""

from __future__ import annotations

import torch

from lina.placement.estimators import OnlinePathEstimator, PopularityEstimator
from lina.placement.metrics import token_topk_hits


class EstimatorWatch:
    """Per engine step on this rank: tokens scored and top-k hits; learns when the estimator's path
    table is an :class:`OnlinePathEstimator`.

    Args:
        estimator: what the placement plans with (a decode-aware one is scored on its path part,
            as lina's phase 1 uses it).
        learner: the table to update, or None (score only).
    """

    def __init__(self, estimator: PopularityEstimator, learner: OnlinePathEstimator | None):
        self.estimator, self.learner = estimator, learner
        self.hits: list[int] = []
        self.scored: list[int] = []

    def observe(self, routing: torch.Tensor) -> None:
        """``routing``: LongTensor[T, L, k] the step's gate choices of this rank's tokens."""
        tokens, layers = routing.shape[0], routing.shape[1]
        top1 = routing[:, :, 0]
        hits = 0
        for j in range(1, min(layers, self.estimator.num_layers)) if tokens else ():
            hits += int(token_topk_hits(self.estimator.predict(j, top1[:, :j]), routing[:, j]).sum())
        self.hits.append(hits)
        self.scored.append(tokens * max(0, min(layers, self.estimator.num_layers) - 1))
        if self.learner is not None and tokens:
            for j in range(layers):
                self.learner.update(j, top1[:, :j], routing[:, j])

    @property
    def updates(self) -> int:
        return 0 if self.learner is None else self.learner.updates


def hit_rate_report(per_rank: list[dict]) -> dict:
    """Over all ranks' ``{"hits": [...], "scored": [...], "updates": n}`` (one entry per step,
    the same steps on every rank): the hit rate of the whole run, of its first and second half
    of steps, and the table updates made."""
    steps = len(per_rank[0]["hits"])
    hits = [sum(r["hits"][i] for r in per_rank) for i in range(steps)]
    scored = [sum(r["scored"][i] for r in per_rank) for i in range(steps)]
    half = steps // 2

    def rate(lo: int, hi: int) -> float | None:
        n = sum(scored[lo:hi])
        return sum(hits[lo:hi]) / n if n else None

    return {
        "topk_hit_rate": rate(0, steps),
        "first_half": rate(0, half),
        "second_half": rate(half, steps),
        "steps": steps,
        "updates": sum(r["updates"] for r in per_rank),
    }

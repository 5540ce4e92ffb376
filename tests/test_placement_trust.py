"""An estimator earns its use: lina plans phase 1 from the estimate only while it is recently at
least as accurate as the recent real counts, falls back to those counts otherwise (as EPLB
plans from the past), reports the source of each layer's plan, and never does worse than static
or EPLB on a trace where the estimator is useless."""

import numpy as np
import pytest
import torch

from lina.data.routing_trace import RoutingTrace
from lina.infer.policies import ServingContext, serving_policy
from lina.infer.replay import replay_policy
from lina.placement.estimators import PathEstimator
from lina.placement.trust import ESTIMATE, RECENT_COUNTS, EstimateTrust, share_distance

E, L, K, N = 16, 4, 2, 4


def _trace(experts: np.ndarray) -> RoutingTrace:
    t = experts.shape[0]
    return RoutingTrace(
        experts=experts.astype(np.int16),
        seq_id=np.zeros(t, dtype=np.int32),
        token_idx=np.arange(t, dtype=np.int32),
        num_experts=E,
        top_k=K,
    )


def _pick(g: np.random.Generator, probs: np.ndarray, t: int) -> np.ndarray:
    """t tokens' top-k distinct experts drawn from probs [E] -> [t, k]."""
    return np.stack([g.choice(E, size=K, replace=False, p=probs) for _ in range(t)])


def stable_skew_trace(seed: int, tokens: int = 1536, reverse: bool = False) -> np.ndarray:
    """Every layer has a fixed Zipf popularity (its own ranking) and a token's choices do not
    depend on its path: the recent counts predict the next batch well."""
    g = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, E + 1) ** 1.2
    zipf /= zipf.sum()
    layers = []
    for layer in range(L):
        ranking = np.random.default_rng(100 + layer).permutation(E)
        if reverse:
            ranking = ranking[::-1]
        probs = np.empty(E)
        probs[ranking] = zipf
        layers.append(_pick(g, probs, tokens))
    return np.stack(layers, axis=1)  # [T, L, k]


def path_driven_trace(seed: int, tokens: int = 1536, batch: int = 64) -> np.ndarray:
    """Each batch's first-layer popularity is new (a different hot set every batch), and every
    later layer's choices follow from the token's previous top-1 expert: the path predicts the
    next layer exactly while the recent counts do not."""
    g = np.random.default_rng(seed)
    perms = [np.random.default_rng(200 + j).permutation(E) for j in range(L)]
    rows = []
    for _ in range(tokens // batch):
        hot = g.permutation(E)[:3]
        probs = np.full(E, 0.1 / (E - 3))
        probs[hot] = 0.9 / 3
        first = _pick(g, probs, batch)
        layers = [first]
        for j in range(1, L):
            top1 = perms[j][layers[-1][:, 0]]
            layers.append(np.stack([top1, (top1 + 1) % E], axis=1))
        rows.append(np.stack(layers, axis=1))
    return np.concatenate(rows)


def _run(name: str, experts: np.ndarray, estimator=None):
    ctx = ServingContext(E, N, K, L, estimator, eplb_window=8, eplb_replan_every=4)
    return replay_policy(serving_policy(name, ctx), torch.from_numpy(experts.astype(np.int64)), list(range(1, L)), 64)


def _p95(values: list[float]) -> float:
    return float(np.quantile(values, 0.95))


def test_share_distance_and_trust():
    a = torch.tensor([3.0, 1.0, 0.0])
    assert share_distance(a, a * 5) == 0.0 and share_distance(a, torch.tensor([0.0, 0.0, 2.0])) == 1.0
    trust = EstimateTrust(decay=0.5)
    assert trust.source(1, has_recent_counts=False) == ESTIMATE
    real = torch.tensor([4.0, 0.0, 0.0])
    trust.observe(1, estimate=torch.tensor([0.0, 4.0, 0.0]), recent_counts=real, real=real)
    assert trust.source(1, has_recent_counts=True) == RECENT_COUNTS
    for _ in range(3):  # the estimate becomes right again: it wins back its use
        trust.observe(1, estimate=real, recent_counts=torch.tensor([0.0, 0.0, 4.0]), real=real)
    assert trust.source(1, has_recent_counts=True) == ESTIMATE


def test_a_useless_estimator_falls_back_and_lina_is_never_worse_than_static_or_eplb():
    serving = stable_skew_trace(1)
    useless = PathEstimator(2).fit(_trace(stable_skew_trace(2, reverse=True)))  # fitted on the opposite skew
    lina, static, eplb = _run("lina", serving, useless), _run("static", serving), _run("eplb", serving)
    used = [s.get(RECENT_COUNTS, 0) / max(1, s.get(RECENT_COUNTS, 0) + s.get(ESTIMATE, 0)) for s in lina.sources[1:]]
    assert min(used) > 0.8, lina.sources  # the fallback is taken
    best_p95 = min(_p95(static.imbalance), _p95(eplb.imbalance))
    assert _p95(lina.imbalance) <= best_p95
    assert np.mean(lina.imbalance) <= min(np.mean(static.imbalance), np.mean(eplb.imbalance))
    # the phase-1 plans alone (from the last counts) already beat static
    assert np.mean(lina.phase1_imbalance) < np.mean(static.imbalance)


def test_without_the_fallback_the_useless_estimate_plans_badly():
    serving = stable_skew_trace(1)
    useless = PathEstimator(2).fit(_trace(stable_skew_trace(2, reverse=True)))
    trusting = _run("lina", serving, useless)
    ctx = ServingContext(E, N, K, L, useless, trust_decay=0.7)
    policy = serving_policy("lina", ctx)
    policy.phase1_source = lambda layer: ESTIMATE  # always trust the estimate
    blind = replay_policy(policy, torch.from_numpy(serving.astype(np.int64)), list(range(1, L)), 64)
    assert np.mean(trusting.phase1_imbalance) < np.mean(blind.phase1_imbalance)


def test_an_accurate_estimator_is_used_and_comes_close_to_the_oracle():
    serving = path_driven_trace(1)
    accurate = PathEstimator(1).fit(_trace(path_driven_trace(2)))
    lina, oracle, eplb = _run("lina", serving, accurate), _run("oracle", serving), _run("eplb", serving)
    used = [s.get(ESTIMATE, 0) / max(1, s.get(RECENT_COUNTS, 0) + s.get(ESTIMATE, 0)) for s in lina.sources[1:]]
    assert min(used) > 0.9, lina.sources
    assert all(
        s.get("replanned", 0) <= 0.2 * sum(s.get(k, 0) for k in (ESTIMATE, RECENT_COUNTS)) for s in lina.sources[1:]
    )
    gain = np.mean(eplb.imbalance) - np.mean(oracle.imbalance)
    assert gain > 0
    assert np.mean(eplb.imbalance) - np.mean(lina.phase1_imbalance) >= 0.7 * gain


@pytest.mark.parametrize("name,source", [("static", "static"), ("eplb", "history"), ("oracle", "real")])
def test_other_policies_report_their_one_source(name, source):
    rep = _run(name, stable_skew_trace(3, tokens=256))
    assert rep.sources == [{source: 4}] * L

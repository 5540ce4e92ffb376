"""Popularity estimators: the paper's path table, its online variant, the logistic model, and scoring."""

import numpy as np
import pytest
import torch

from lina.data.routing_trace import RoutingTrace, synthetic_trace
from lina.errors import ConfigError, LinaError
from lina.infer.replay import placement_balance
from lina.placement.estimators import LogisticEstimator, OnlinePathEstimator, PathEstimator, load_estimator
from lina.placement.estimators.logistic import WEIGHT_DECAY_GRID
from lina.placement.evaluate import score_estimator
from lina.placement.metrics import token_topk_hits


def _deterministic_trace(tokens=64, layers=4, experts=4) -> RoutingTrace:
    """Top-1 at layer j+1 is (top-1 at layer j + 1) mod E: a path fully decides the next expert."""
    start = np.arange(tokens) % experts
    ex = np.stack([(start + j) % experts for j in range(layers)], axis=1)[:, :, None]
    return RoutingTrace(ex, np.zeros(tokens), np.arange(tokens), num_experts=experts, top_k=1, source="det")


def test_path_estimator_learns_deterministic_transitions():
    tr = _deterministic_trace()
    est = PathEstimator(path_len=2).fit(tr)
    ex = tr.expert_tensor()
    for layer in range(1, 4):
        probs = est.predict(layer, ex[:, :layer])
        assert probs.shape == (64, 4)
        assert torch.allclose(probs.sum(dim=1), torch.ones(64))
        assert token_topk_hits(probs, ex[:, layer]).all()
    pop = est.popularity(2, ex[:, :2])
    assert torch.allclose(pop, torch.full((4,), 16.0, dtype=torch.float64))  # 64 tokens spread evenly


def test_unseen_path_backs_off_to_shorter_paths_then_the_marginal():
    # Layer 2 always picks expert 3 after (0, 1); the marginal of layer 2 is 3 as well.
    ex = np.array([[[0], [1], [3]]] * 5 + [[[2], [1], [0]]] * 1)
    tr = RoutingTrace(ex, np.zeros(6), np.arange(6), num_experts=4, top_k=1)
    est = PathEstimator(path_len=2).fit(tr)
    seen = est.predict(2, torch.tensor([[0, 1]]))[0]
    assert seen[3] == 1.0
    # Path (3, 1) was never seen; its last layer (1) was: 5 of 6 times followed by 3.
    backed = est.predict(2, torch.tensor([[3, 1]]))[0]
    assert backed[3] == pytest.approx(5 / 6) and backed[0] == pytest.approx(1 / 6)
    assert est.coverage(2, torch.tensor([[0, 1], [3, 1], [3, 2]])).tolist() == [2, 1, 0]
    marginal = est.predict(2, torch.tensor([[3, 2]]))[0]
    assert marginal[3] == pytest.approx(5 / 6)
    smoothed = PathEstimator(path_len=2, smoothing=1.0).fit(tr).predict(2, torch.tensor([[2, 1]]))[0]
    assert 0 < smoothed[3] < 1 and smoothed[0] > 1 / 6  # the one-off path counts, but does not rule


def test_history_as_topk_and_validation():
    tr = synthetic_trace(200, 4, 8, top_k=2, seed=0)
    est = PathEstimator(path_len=3).fit(tr)
    ex = tr.expert_tensor()
    assert torch.equal(est.predict(3, ex[:, :3]), est.predict(3, ex[:, :3, 0]))
    with pytest.raises(ConfigError):
        est.predict(4, ex[:, :3])
    with pytest.raises(ConfigError):
        est.predict(2, torch.full((3, 2), 9))
    with pytest.raises(LinaError, match="not fitted"):
        PathEstimator().predict(0, ex[:, :0])


def test_popularity_modes_count_token_slots():
    tr = synthetic_trace(300, 3, 8, top_k=2, seed=1)
    est = PathEstimator(path_len=2).fit(tr)
    hist = tr.expert_tensor()[:50, :2]
    expected = est.popularity(2, hist, mode="expected")
    assert expected.sum().item() == pytest.approx(100.0)  # 50 tokens x 2 slots
    topk = est.popularity(2, hist)
    assert topk.sum().item() <= 100.0 + 1e-6
    assert ((topk > 0).sum(dim=0) <= 8).all()
    with pytest.raises(ConfigError):
        est.popularity(2, hist, mode="median")


@pytest.mark.parametrize("kind", ["path", "online", "logistic"])
def test_save_load_round_trip_predicts_the_same(tmp_path, kind):
    tr = synthetic_trace(300, 4, 8, top_k=2, seed=2)
    if kind == "path":
        est = PathEstimator(path_len=2, smoothing=0.5).fit(tr)
    elif kind == "online":
        est = OnlinePathEstimator.from_offline(PathEstimator(2).fit(tr), decay=0.8)
    else:
        est = LogisticEstimator(path_len=2, weight_decay=1e-2, steps=30).fit(tr)
    path = est.save(tmp_path / "est.npz")
    with np.load(path, allow_pickle=False) as data:
        assert "meta" in data.files
    back = load_estimator(path)
    assert type(back) is type(est)
    hist = tr.expert_tensor()[:40, :3]
    assert torch.allclose(back.predict(3, hist), est.predict(3, hist), atol=1e-6)
    with pytest.raises(ConfigError):
        est.save(tmp_path / "est.pkl")


def test_online_estimator_follows_a_shift_the_offline_one_misses():
    offline_tr = _deterministic_trace(tokens=64, layers=3, experts=4)
    ex = offline_tr.experts.astype(np.int64)
    shifted = ex.copy()
    shifted[:, 2, 0] = (ex[:, 1, 0] + 2) % 4  # serving traffic follows another rule at layer 2
    serve = torch.from_numpy(shifted)
    offline = PathEstimator(path_len=1).fit(offline_tr)
    online = OnlinePathEstimator.from_offline(offline, decay=0.5)
    for _ in range(3):
        online.update(2, serve[:, :2], serve[:, 2])
    assert token_topk_hits(online.predict(2, serve[:, :2]), serve[:, 2]).all()
    assert not token_topk_hits(offline.predict(2, serve[:, :2]), serve[:, 2]).any()
    assert online.updates == 3
    with pytest.raises(ConfigError):
        OnlinePathEstimator(decay=0.0)


def test_online_estimator_can_start_empty():
    est = OnlinePathEstimator.empty(num_experts=4, num_layers=3, top_k=1, path_len=1)
    serve = torch.from_numpy(_deterministic_trace(32, 3, 4).experts.astype(np.int64))
    assert torch.allclose(est.predict(1, serve[:, :1]), torch.full((32, 4), 0.25))
    est.update(1, serve[:, :1], serve[:, 1])
    assert token_topk_hits(est.predict(1, serve[:, :1]), serve[:, 1]).all()


def test_logistic_estimator_beats_the_marginal_on_affine_traffic():
    tr = synthetic_trace(600, 5, 8, top_k=2, affinity=0.8, seed=4, tokens_per_seq=100)
    fit, held = tr.split(0.5, by="seq")
    layers = [3, 4]
    learned = score_estimator(LogisticEstimator(path_len=2, weight_decay=1e-3, steps=100).fit(fit), held, layers)
    marginal = score_estimator(PathEstimator(path_len=0).fit(fit), held, layers)
    assert learned.token_top1 > marginal.token_top1 + 0.3
    assert learned.token_topk > marginal.token_topk


def test_logistic_auto_weight_decay_picks_from_the_grid():
    tr = synthetic_trace(200, 3, 4, top_k=1, seed=5, tokens_per_seq=50)
    est = LogisticEstimator(path_len=1, steps=20).fit(tr)
    assert est.chosen_weight_decay in WEIGHT_DECAY_GRID
    assert set(est.selection_scores) == set(WEIGHT_DECAY_GRID)
    assert est.selection_scores[est.chosen_weight_decay] == min(est.selection_scores.values())
    with pytest.raises(ConfigError):
        LogisticEstimator(weight_decay=-1.0)


def test_score_and_balance_replay_on_a_synthetic_trace():
    tr = synthetic_trace(400, 5, 8, top_k=2, affinity=0.9, skew=1.2, seed=6, tokens_per_seq=100)
    fit, held = tr.split(0.5, by="seq")
    score = score_estimator(PathEstimator(2).fit(fit), held, [2, 3, 4], batch_tokens=50)
    assert score.batches == 4 and score.tokens == 200 and len(score.per_layer_topk) == 3
    assert 0.0 <= score.batch_match <= 1.0 and score.token_top1 > 0.5
    rep = placement_balance(PathEstimator(2).fit(fit), held, 4, [2, 3, 4], batch_tokens=50)
    assert rep.samples == 12
    assert rep.mean["oracle"] <= rep.mean["static"] + 1e-9
    assert rep.mean["lina"] <= rep.mean["lina-phase1"] + 1e-9  # phase 2 only ever re-plans to the oracle
    assert rep.mean["lina-expected"] <= rep.mean["lina-expected-phase1"] + 1e-9
    assert set(rep.replan_rate) == {"lina", "lina-expected"}
    assert all(0.0 <= r <= 1.0 for r in rep.replan_rate.values())


def test_logistic_history_forms():
    tr = synthetic_trace(120, 3, 4, top_k=2, seed=7)
    hist = tr.expert_tensor()[:10, :2]
    top1_only = LogisticEstimator(path_len=2, use_topk=False, weight_decay=1e-2, steps=10).fit(tr)
    assert torch.allclose(top1_only.predict(2, hist[:, :, 0]), top1_only.predict(2, hist))
    both = LogisticEstimator(path_len=2, weight_decay=1e-2, steps=10).fit(tr)
    assert both.weight.shape == (3, 2 * 3 * 4, 4)  # 2 layers x (any rank + 2 ranks) x 4 experts
    with pytest.raises(ConfigError, match="experts per layer"):
        both.predict(2, hist[:, :, 0])

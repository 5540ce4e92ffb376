"""Inference simulation: the real placement policies on replayed routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lina.errors import ConfigError
from lina.infer.policies import make_serving_policy
from lina.placement.estimators import PathEstimator
from lina.sim.collectives import all_to_all_matrix
from lina.sim.compute import ComputeProfile
from lina.sim.infer import InferSpec, a2a_bottleneck_time, batch_estimate, simulate_inference
from lina.sim.routing import drifting_trace
from lina.sim.spec import ClusterSpec, ModelSpec
from lina.sim.topology import Topology
from lina.sim.train import transfer_time

PROFILE = ComputeProfile(
    dense_fwd_s_per_token=1e-7,
    dense_bwd_s_per_token=2e-7,
    expert_fwd_s_per_token=2e-7,
    expert_bwd_s_per_token=4e-7,
    expert_min_s=1e-5,
)


def test_drifting_trace_is_skewed_per_batch_and_follows_successors():
    tr = drifting_trace(4, 4000, 3, 8, top_k=2, affinity=0.8, concentration=1.0, model_seed=3, batch_seed=5)
    assert tr.experts.shape == (16000, 3, 2)
    assert (tr.experts[:, :, 0] != tr.experts[:, :, 1]).all()  # no repeated expert in a token's top-k
    counts = [np.bincount(tr.experts[b * 4000 : (b + 1) * 4000, 1, 0], minlength=8) for b in range(4)]
    assert max(c.max() / max(c.min(), 1) for c in counts) > 3  # skewed
    assert not all((counts[0] == c).all() for c in counts[1:])  # and it drifts between batches
    # same model seed: same successor structure, so a path estimator fitted on one trace predicts the other
    other = drifting_trace(4, 4000, 3, 8, top_k=2, affinity=0.8, concentration=1.0, model_seed=3, batch_seed=9)
    est = PathEstimator(path_len=1).fit(other)
    hist = torch.from_numpy(tr.experts[:, :1, 0].astype(np.int64))
    hit = (est.predict(1, hist).argmax(dim=1).numpy() == tr.experts[:, 1, 0]).mean()
    assert hit > 0.7


def test_batch_estimate_equals_the_policy_estimate():
    fit = drifting_trace(2, 3000, 5, 8, model_seed=1, batch_seed=2)
    replay = drifting_trace(1, 2000, 5, 8, model_seed=1, batch_seed=3)
    est = PathEstimator(path_len=3).fit(fit)
    policy = make_serving_policy("lina", 8, 4, 1, 5, est)
    paths = torch.from_numpy(replay.experts[:, :, 0].astype(np.int64))
    for layer in range(1, 5):
        ours = batch_estimate(policy, layer, paths[:, :layer])
        theirs = policy.local_estimate(layer, paths[:, :layer])
        torch.testing.assert_close(ours, theirs.double(), rtol=1e-9, atol=1e-6)


def test_bottleneck_time_tracks_the_flow_simulation():
    c = ClusterSpec(hosts=4, gpus_per_host=4, link_gbps=100, nvlink_gbps=2400, launch_s=0, per_peer_s=0)
    topo = Topology(c, representative=False)
    rng = np.random.default_rng(0)
    for _ in range(5):
        pop = rng.dirichlet(np.full(16, 0.7))
        traffic = np.outer(np.ones(16), pop) * 64e6  # every device sends by the same skewed popularity
        exact = transfer_time(topo, all_to_all_matrix(topo, traffic))
        fast = a2a_bottleneck_time(c, traffic)
        assert fast <= exact * (1 + 1e-9)  # the bottleneck is a lower bound
        assert fast == pytest.approx(exact, rel=0.05)


def small_case():
    cluster = ClusterSpec(hosts=2, gpus_per_host=2, link_gbps=25)
    model = ModelSpec("m", layers=6, d_model=256, d_ff=1024, experts=8, top_k=1, seq_len=128, batch_size=4, act_bytes=2)
    spec = InferSpec(tokens_per_device=512, batches=6, warmup_batches=2)
    n_tok = cluster.gpus * spec.tokens_per_device
    replay = drifting_trace(8, n_tok, 6, 8, affinity=0.7, concentration=1.5, model_seed=4, batch_seed=1)
    fit = drifting_trace(8, n_tok, 6, 8, affinity=0.7, concentration=1.5, model_seed=4, batch_seed=2)
    return cluster, model, spec, replay, PathEstimator(path_len=3).fit(fit)


def test_inference_policies_run_and_oracle_balances_best():
    cluster, model, spec, replay, est = small_case()
    res = simulate_inference(cluster, model, PROFILE, spec, replay, est)
    assert set(res) == {"static", "eplb", "lina", "oracle"}
    for r in res.values():
        assert len(r.latencies_s) == spec.batches
        assert len(r.layer_a2a_s) == spec.batches * model.moe_layers
    assert res["static"].speedup_median == pytest.approx(1.0)
    # the oracle plans on the real counts: its busiest device has no more work than static's
    assert np.median(res["oracle"].layer_expert_s) <= np.median(res["static"].layer_expert_s)
    assert res["oracle"].p95_s < res["static"].p95_s
    assert res["lina"].checked == spec.batches * (model.moe_layers - 1) + spec.warmup_batches * (model.moe_layers - 1)
    assert 0 <= res["lina"].replans <= res["lina"].checked


def test_exact_network_gives_close_latencies():
    cluster, model, spec, replay, est = small_case()
    fast = simulate_inference(cluster, model, PROFILE, spec, replay, est, policies=("static",))
    exact = simulate_inference(
        cluster,
        model,
        PROFILE,
        InferSpec(**{**spec.__dict__, "exact_network": True}),
        replay,
        est,
        policies=("static",),
    )
    assert exact["static"].median_s == pytest.approx(fast["static"].median_s, rel=0.05)


def test_inference_rejects_a_trace_of_another_model():
    cluster, model, spec, replay, est = small_case()
    wrong = ModelSpec("m", layers=5, d_model=256, d_ff=1024, experts=8, top_k=1, seq_len=128, batch_size=4)
    with pytest.raises(ConfigError):
        simulate_inference(cluster, wrong, PROFILE, spec, replay, est)
    with pytest.raises(ConfigError):
        simulate_inference(cluster, model, PROFILE, InferSpec(tokens_per_device=512, batches=50), replay, est)

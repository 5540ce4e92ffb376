"""``lina generate`` with an estimator fitted on a recorded trace, learning online, and the
``lina-window-predict`` placement: outputs stay the plain model's; a wrong estimator file is
refused before any worker starts."""

import json

import numpy as np
import pytest
import torch

from conftest import run_lina
from lina.data.routing_trace import synthetic_trace
from lina.infer.engine import InferenceEngine, LayerRouting
from lina.infer.model_adapter import load_trained_model
from lina.infer.policies import ServingContext, make_serving_policy, serving_policy
from lina.infer.replay import replay_policy
from lina.infer.store import ExpertStore
from lina.placement.estimators import DecodeAwareEstimator, OnlinePathEstimator, PathEstimator, load_estimator
from lina.serve.online import EstimatorWatch, hit_rate_report
from lina.serve.reference import reference_generate
from lina.serve.requests import encode
from test_generate import trained  # noqa: F401  (the module's tiny trained model)


def _aware(trace) -> DecodeAwareEstimator:
    return DecodeAwareEstimator(PathEstimator(2).fit(trace)).fit(trace)


def test_decode_estimator_roundtrips_through_its_file(tmp_path):
    trace = synthetic_trace(512, 3, 8, top_k=2, affinity=0.7, tokens_per_seq=32)
    aware = _aware(trace)
    loaded = load_estimator(aware.save(tmp_path / "d.npz"))
    assert isinstance(loaded, DecodeAwareEstimator) and loaded.path_len == 2
    ex = trace.expert_tensor()
    prev = torch.full((ex.shape[0],), 3)
    torch.testing.assert_close(loaded.predict(2, ex[:, :2, 0], prev), aware.predict(2, ex[:, :2, 0], prev))
    torch.testing.assert_close(loaded.alpha, aware.alpha)


def test_online_watch_learns_the_served_routing_and_counts_hits():
    trace = synthetic_trace(256, 3, 8, top_k=2, affinity=0.7, tokens_per_seq=32, seed=1)
    online = OnlinePathEstimator.from_offline(PathEstimator(2).fit(trace), decay=0.5)
    before = [counts.copy() for _, counts in online._tables[2]]
    watch = EstimatorWatch(online, online)
    routing = torch.tensor([[[1, 2], [3, 4], [5, 6]]] * 10)  # [T=10, L=3, k=2], the same path each time
    watch.observe(routing)
    watch.observe(routing[:0])  # a rank with no token this step learns nothing
    assert watch.updates == 3 and watch.scored == [20, 0]
    assert any(a.shape != b.shape or not np.allclose(a, b) for a, b in zip(before, (c for _, c in online._tables[2])))
    top = torch.topk(online.predict(2, routing[:1, :2, 0]), 2).indices[0].tolist()
    assert sorted(top) == [5, 6]  # the tables now follow what was served
    report = hit_rate_report([{"hits": watch.hits, "scored": watch.scored, "updates": watch.updates}] * 2)
    assert report["updates"] == 6 and report["steps"] == 2 and report["second_half"] is None


def test_window_predict_plans_from_the_forecast_and_falls_back_when_it_is_worse():
    sticky = synthetic_trace(1024, 2, 8, top_k=2, affinity=0.9, skew=1.2, tokens_per_seq=64, seed=2)
    ctx = ServingContext(8, 4, 2, 2, estimator=_aware(sticky), decode_window=4)
    policy = serving_policy("lina-window-predict", ctx)
    rep = replay_policy(policy, sticky.expert_tensor(), [0, 1], 8)
    windows = 1024 // 8 // 4
    assert all(sum(s.values()) == windows for s in rep.sources) and policy.stats["moves"] > 0
    assert rep.sources[0].get("estimate", 0) > 0
    # an estimator fitted on another model's routing: the trust rule falls back to recent counts
    other = synthetic_trace(1024, 2, 8, top_k=2, affinity=0.0, skew=0.0, tokens_per_seq=64, seed=3)
    policy = serving_policy("lina-window-predict", ServingContext(8, 4, 2, 2, estimator=_aware(other), decode_window=4))
    rep = replay_policy(policy, sticky.expert_tensor(), [0, 1], 8)
    assert sum(s.get("recent_counts", 0) for s in rep.sources) > 0


def test_window_predict_needs_a_decode_estimator():
    trace = synthetic_trace(256, 2, 8, top_k=2, tokens_per_seq=32)
    with pytest.raises(Exception, match="decode-aware"):
        serving_policy("lina-window-predict", ServingContext(8, 2, 2, 2, estimator=PathEstimator(1).fit(trace)))


def test_window_predict_in_the_engine_keeps_the_outputs():
    trace = synthetic_trace(512, 2, 8, top_k=2, affinity=0.8, tokens_per_seq=32)
    ctx = ServingContext(8, 1, 2, 2, estimator=_aware(trace), decode_window=2)
    predict = InferenceEngine(
        ExpertStore.random(2, 8, 16, 32, seed=0), 2, None, serving_policy("lina-window-predict", ctx)
    )
    static = InferenceEngine(
        ExpertStore.random(2, 8, 16, 32, seed=0), 2, None, make_serving_policy("static", 8, 1, 2, 2)
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        h = torch.randn(6, 16, generator=g)
        ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(6)])
        gate = lambda j, x: LayerRouting(ids, torch.full((6, 2), 0.5))  # noqa: E731
        dense = lambda j, x: (x, x)  # noqa: E731
        out_p, _ = predict.run_batch(h, dense, gate)
        out_s, _ = static.run_batch(h, dense, gate)
        torch.testing.assert_close(out_p, out_s, atol=1e-5, rtol=0)
    assert sum(predict.policy.source_report(2)[0].values()) == 3  # one plan per window of 2 steps


def _generate(model_dir, prompts, out, *extra):
    res = run_lina(
        "generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out), *extra, timeout=300
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return rows, json.loads(out.with_suffix(".summary.json").read_text()), res.stdout


def _assert_reference(model_dir, rows):
    model = load_trained_model(model_dir)
    for row in rows:
        assert row["tokens"] == reference_generate(model, encode(row["prompt"]), len(row["tokens"])), row["id"]
    assert [len(r["tokens"]) for r in rows] == [10, 3, 6]


@pytest.mark.slow
def test_fit_an_estimator_from_a_recorded_trace_and_serve_with_it(trained, tmp_path):  # noqa: F811
    model_dir, prompts = trained
    trace = tmp_path / "trace.npz"
    assert (
        run_lina("infer", "--model", str(model_dir), "--record-trace", str(trace), "--sequences", "8").returncode == 0
    )
    est = tmp_path / "decode.npz"
    res = run_lina("analyze", "trace", str(trace), "--save-estimator", str(est), "--estimator", "decode")
    assert res.returncode == 0 and "lina generate --estimator" in res.stdout, res.stderr[-2000:]
    assert isinstance(load_estimator(est), DecodeAwareEstimator)
    rows, summary, _ = _generate(
        model_dir, prompts, tmp_path / "o.jsonl", "--estimator", str(est), "--placement", "lina-window-predict"
    )
    _assert_reference(model_dir, rows)
    assert summary["estimator"]["source"] == str(est.resolve()) and summary["estimator"]["updates"] == 0


@pytest.mark.slow
def test_a_wrong_estimator_file_is_refused_before_launch(trained, tmp_path):  # noqa: F811
    model_dir, prompts = trained
    wide = PathEstimator(2).fit(synthetic_trace(256, 3, 16, top_k=2, tokens_per_seq=32)).save(tmp_path / "wide.npz")
    not_est = synthetic_trace(64, 3, 4, top_k=2).save(tmp_path / "trace.npz")
    cases = [
        (wide, "lina", "16 experts x 3 MoE layers, the model has 4 x 3"),
        (not_est, "lina", "is not a lina estimator"),
        (tmp_path / "missing.npz", "lina", "missing.npz not found"),
        (wide, "static", "placement static uses no estimator"),
    ]
    for path, placement, message in cases:
        res = run_lina(
            "generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
            "--placement", placement, "--estimator", str(path), timeout=120,
        )  # fmt: skip
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr[-1500:]
        assert "--save-estimator" in res.stderr or "drop --estimator" in res.stderr
        assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.slow
def test_online_learning_changes_no_output(trained, tmp_path):  # noqa: F811
    model_dir, prompts = trained
    rows, summary, stdout = _generate(
        model_dir, prompts, tmp_path / "o.jsonl", "--placement", "lina", "--online-decay", "0.5", "--workers", "2"
    )
    _assert_reference(model_dir, rows)
    est = summary["estimator"]
    assert est["online_decay"] == 0.5 and est["updates"] > 0 and est["steps"] == 10
    assert 0 <= est["first_half"] <= 1 and 0 <= est["second_half"] <= 1 and "online update(s)" in stdout


@pytest.mark.slow
def test_device_time_timings_with_the_real_text(trained, tmp_path):  # noqa: F811
    model_dir, prompts = trained
    real, _, _ = _generate(model_dir, prompts, tmp_path / "r.jsonl", "--workers", "2")
    rows, summary, stdout = _generate(
        model_dir, prompts, tmp_path / "d.jsonl", "--workers", "2", "--compute", "a100", "--dilation", "50"
    )
    assert [r["text"] for r in rows] == [r["text"] for r in real]
    assert summary["timings"] == "timings: a100 device time at dilation 50; text from the real model"
    assert summary["timings"] in stdout and summary["token_latency_s"]["p50"] > 0
    assert summary["measured"]["token_latency_s"]["p50"] > 0 and summary["dilation"] == 50
    assert all(len(r["token_latencies_s"]) == len(r["tokens"]) - 1 and "measured" in r for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra,message",
    [
        (["--compute", "a100", "--dilation", "0.5"], "below 1"),
        (["--compute", "tpu9"], "tpu9"),
        (["--emulate", "hosts=2,speed=1"], "not a key=value pair I know"),
        (["--online-decay", "1.5"], "outside (0, 1]"),
        (["--emulate", "hosts=3,link=1gbit", "--workers", "2"], "--workers 3"),
    ],
)
def test_bad_compute_or_emulate_exits_2(trained, tmp_path, extra, message):  # noqa: F811
    model_dir, prompts = trained
    res = run_lina(
        "generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"), *extra,
        timeout=120,
    )  # fmt: skip
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr[-1500:]


def _can_emulate() -> bool:
    import os
    import shutil

    from lina.cluster import netns

    return os.geteuid() == 0 and not netns.probe_support().missing() and shutil.which("tc") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _can_emulate(), reason="needs root, tc and ip to build the emulated cluster")
def test_generate_on_the_emulated_cluster_gives_the_same_text(trained, tmp_path):  # noqa: F811
    model_dir, prompts = trained
    rows, summary, _ = _generate(
        model_dir, prompts, tmp_path / "e.jsonl", "--emulate", "hosts=2,link=1gbit", "--workers", "2"
    )
    _assert_reference(model_dir, rows)
    assert summary["workers"] == 2

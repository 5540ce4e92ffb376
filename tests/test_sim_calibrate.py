"""Calibration: fit known parameters back from synthetic run directories and predict the runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lina.errors import ConfigError, LinaError
from lina.sim.calibration import calibrate, find_runs, read_run
from lina.sim.compute import ComputeProfile
from lina.sim.spec import ClusterSpec, CpuHostModel, ModelSpec, TrainSpec
from lina.testing.calibration import write_synthetic_run

TRUTH = ComputeProfile(
    dense_fwd_s_per_token=2e-6,
    dense_bwd_s_per_token=4e-6,
    expert_fwd_s_per_token=3e-6,
    expert_bwd_s_per_token=6e-6,
    optimizer_s_per_param=2e-9,
)
EFFICIENCY = 0.8
LAUNCH = 1e-3
HOP = 2e-4


def make_runs(root):
    runs = [
        (0.2, "ddp-overlap", 8),
        (0.1, "ddp-overlap", 4),
        (0.2, "lina", 8),
        (0.4, "sequential", 8),
        (0.1, "tutel", 8),
    ]
    for i, (gbps, policy, batch) in enumerate(runs):
        cluster = ClusterSpec(
            hosts=2,
            gpus_per_host=2,
            link_gbps=gbps,
            link_efficiency=EFFICIENCY,
            launch_s=LAUNCH,
            per_peer_s=0,
            hop_latency_s=HOP,
        )
        model = ModelSpec(
            "tiny",
            layers=4,
            d_model=128,
            d_ff=512,
            experts=4,
            top_k=2,
            seq_len=128,
            batch_size=batch,
            vocab=256,
            act_bytes=4,
            grad_bytes=4,
            param_bytes=4,
        )
        # one micro-op per tensor: many small uncontended allreduces pin the fitted latency
        write_synthetic_run(
            root / f"run{i}",
            cluster,
            model,
            TRUTH,
            TrainSpec(lina_a2a_chunks=2, coalesce_small=False),
            policy,
            steps=4,
            jitter=0.02,
            seed=i,
        )
    return len(runs)


@pytest.mark.slow
def test_fit_recovers_known_parameters_and_predicts_within_10_percent(tmp_path):
    n = make_runs(tmp_path)
    rep = calibrate(tmp_path)
    f = rep.fit
    assert f.link_efficiency == pytest.approx(EFFICIENCY, rel=0.05)
    # 2% jitter on 26-52 ms all-to-alls: efficiency and latency trade off within the noise
    # (1% of efficiency is about 0.3 ms of latency)
    assert f.a2a_latency_s == pytest.approx(LAUNCH, abs=5e-4)
    # one ring size (4 ranks): launch and per-step latency add up to what one allreduce costs
    assert f.allreduce_launch_s + 2 * 3 * f.allreduce_hop_s == pytest.approx(LAUNCH + 2 * 3 * HOP, rel=0.1)
    p = f.profile
    for name in (
        "dense_fwd_s_per_token",
        "dense_bwd_s_per_token",
        "expert_fwd_s_per_token",
        "expert_bwd_s_per_token",
        "optimizer_s_per_param",
    ):
        assert getattr(p, name) == pytest.approx(getattr(TRUTH, name), rel=0.05), name
    assert len(rep.rows) == n
    for row in rep.rows:
        assert abs(row["error"]) < 0.10, row
    assert rep.median_abs_error < 0.05


def test_reads_the_trainer_config_form(tmp_path):
    make_runs(tmp_path)
    run = tmp_path / "run0"
    summary = json.loads((run / "summary.json").read_text())
    flat = summary["config"]
    summary = {"step_time_s_median": summary["step_time_s_median"]}  # a summary of schema version 1: a config only
    summary["config"] = {
        "model": {
            "n_layers": flat["layers"],
            "d_model": flat["d_model"],
            "d_ff": flat["d_ff"],
            "experts": flat["experts"],
            "top_k": flat["top_k"],
            "seq_len": flat["seq_len"],
            "vocab_size": flat["vocab"],
            "moe_interval": 1,
        },
        "workers": flat["workers"],
        "batch_size": flat["batch_size"],
        "schedule": "deepspeed",
        "chunk_mb": "auto",
        "bucket_mb": 25.0,
        "pipeline_chunks": 2,
        "ep_size": 0,
        "emulate": "hosts=2,link=200mbit,workers_per_host=2",
    }
    summary["packing"] = {"ep_size": 4}
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(LinaError, match="chunk_mb_resolved"):  # "auto" without what it chose
        read_run(run)
    summary["chunk_mb_resolved"] = 0.5
    (run / "summary.json").write_text(json.dumps(summary))
    rec = read_run(run)
    assert rec.train.chunk_mb == 0.5
    assert (rec.hosts, rec.workers_per_host, rec.link_bps, rec.policy, rec.ep_size) == (2, 2, 200e6, "ddp-overlap", 4)
    assert rec.model.layers == 4 and rec.model.tokens == 128 * 8
    assert rec.a2a_in_flight == 2  # Gloo serves a rank's asynchronous collectives on two threads
    summary["backend"] = "nccl"  # one stream per rank
    (run / "summary.json").write_text(json.dumps(summary))
    assert read_run(run).a2a_in_flight == 1
    assert len(find_runs(tmp_path)) == 5


def test_clear_errors(tmp_path):
    with pytest.raises(LinaError):
        find_runs(tmp_path)  # no summary.json anywhere
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "summary.json").write_text(json.dumps({"config": {"layers": 2}, "step_time_s_median": 1.0}))
    with pytest.raises(LinaError, match="lacks"):
        read_run(tmp_path / "r")


@pytest.mark.slow
def test_fit_recovers_the_compute_slowdown_under_collectives(tmp_path):
    """Collectives that share the compute's cores slow it: policies of one shape that overlap more
    compute longer, and the fit separates that from the work itself."""
    truth = ComputeProfile(**{**TRUTH.to_dict(), "slowdown_in_a2a": 0.3, "slowdown_in_allreduce": 0.15})
    cluster = ClusterSpec(
        hosts=2,
        gpus_per_host=2,
        link_gbps=0.2,
        link_efficiency=EFFICIENCY,
        launch_s=LAUNCH,
        per_peer_s=0,
        hop_latency_s=HOP,
    )
    model = ModelSpec(
        "tiny",
        layers=4,
        d_model=128,
        d_ff=512,
        experts=4,
        top_k=2,
        seq_len=128,
        batch_size=8,
        vocab=256,
        act_bytes=4,
        grad_bytes=4,
        param_bytes=4,
    )
    for i, policy in enumerate(("ddp-overlap", "sequential", "tutel", "lina")):
        write_synthetic_run(
            tmp_path / policy,
            cluster,
            model,
            truth,
            TrainSpec(lina_a2a_chunks=2, coalesce_small=False),
            policy,
            steps=4,
            seed=i,
        )
    rep = calibrate(tmp_path)
    p = rep.fit.profile
    assert p.slowdown_in_a2a == pytest.approx(0.3, abs=0.05)
    assert p.slowdown_in_allreduce == pytest.approx(0.15, abs=0.05)
    assert p.expert_fwd_s_per_token == pytest.approx(TRUTH.expert_fwd_s_per_token, rel=0.1)
    assert p.dense_bwd_s_per_token == pytest.approx(TRUTH.dense_bwd_s_per_token, rel=0.1)
    for row in rep.rows:
        assert abs(row["error"]) < 0.05, row


def test_fit_finds_a_rank_copy_limit_across_layouts(tmp_path):
    """A rank moves its all-to-all bytes at a bounded rate, to whatever peer: runs in two layouts
    pin it down; a link-only fit could not match both (the flat layout puts fewer bytes on each
    host link but each rank sends as many)."""
    rank_gbps = 0.06  # below a rank's share of a 0.1 Gb/s link in the flat layout
    model = ModelSpec(
        "tiny",
        layers=4,
        d_model=128,
        d_ff=512,
        experts=4,
        top_k=2,
        seq_len=128,
        batch_size=8,
        vocab=256,
        act_bytes=4,
        grad_bytes=4,
        param_bytes=4,
    )
    for hosts, per_host in ((4, 1), (2, 2)):
        cluster = ClusterSpec(
            hosts=hosts,
            gpus_per_host=per_host,
            link_gbps=0.1,
            launch_s=LAUNCH,
            per_peer_s=0,
            hop_latency_s=HOP,
            host=CpuHostModel(rank_copy_gbps=rank_gbps),
        )
        for i, policy in enumerate(("ddp-overlap", "sequential")):
            # with the trainer's count exchange: its tiny all-to-alls pin the latency
            write_synthetic_run(
                tmp_path / f"{hosts}x{per_host}-{policy}",
                cluster,
                model,
                TRUTH,
                TrainSpec(coalesce_small=False, count_exchange=True),
                policy,
                steps=4,
                seed=i,
            )
    rep = calibrate(tmp_path)
    assert rep.fit.core_copy_bytes_per_s * 8 / 1e9 == pytest.approx(rank_gbps, rel=0.1)  # one core per rank
    for row in rep.rows:
        assert abs(row["error"]) < 0.05, row


def test_fixed_per_layer_cost_is_found_across_token_counts(tmp_path):
    """A fixed cost per layer and pass (framework overheads) weighs more when a device has few
    tokens: runs at two batch sizes tell it from the per-token cost; one batch size cannot."""
    from lina.sim.calibration import fit_per_layer

    layers = np.array([4.0, 4.0, 4.0])
    tokens = np.array([256.0, 2048.0, 2048.0])
    seconds = layers * (2e-3 + 8e-6 * tokens)
    assert fit_per_layer(layers, tokens, seconds) == pytest.approx((2e-3, 8e-6))
    fixed, per_token = fit_per_layer(layers[1:], tokens[1:], seconds[1:])
    assert fixed == 0.0 and per_token == pytest.approx(2e-3 / 2048 + 8e-6)

    truth = ComputeProfile(**{**TRUTH.to_dict(), "layer_fwd_s": 1e-3, "layer_bwd_s": 2e-3})
    cluster = ClusterSpec(
        hosts=2,
        gpus_per_host=2,
        link_gbps=0.2,
        link_efficiency=EFFICIENCY,
        launch_s=LAUNCH,
        per_peer_s=0,
        hop_latency_s=HOP,
    )
    for batch in (2, 16):
        model = ModelSpec(
            "tiny",
            layers=4,
            d_model=128,
            d_ff=512,
            experts=4,
            top_k=2,
            seq_len=128,
            batch_size=batch,
            vocab=256,
            act_bytes=4,
            grad_bytes=4,
            param_bytes=4,
        )
        for i, policy in enumerate(("ddp-overlap", "sequential")):
            write_synthetic_run(
                tmp_path / f"b{batch}-{policy}",
                cluster,
                model,
                truth,
                TrainSpec(coalesce_small=False, count_exchange=True),
                policy,
                steps=4,
                seed=i,
            )
    rep = calibrate(tmp_path)
    p = rep.fit.profile
    assert p.layer_fwd_s == pytest.approx(1e-3, rel=0.1) and p.layer_bwd_s == pytest.approx(2e-3, rel=0.1)
    assert p.dense_fwd_s_per_token == pytest.approx(TRUTH.dense_fwd_s_per_token, rel=0.1)
    for row in rep.rows:
        assert abs(row["error"]) < 0.05, row


def test_fit_finds_allreduces_slowed_beside_compute_on_shared_cores(tmp_path):
    """Two ranks to a core: an allreduce beside compute moves its bytes 30% slower. Lina's
    micro-ops run beside the backward pass, the sequential policy's after it: the fit tells the
    slowdown from the link."""
    truth = ComputeProfile(**{**TRUTH.to_dict(), "allreduce_slowdown_in_compute": 0.3})
    cluster = ClusterSpec(
        hosts=2,
        gpus_per_host=2,
        link_gbps=0.2,
        link_efficiency=EFFICIENCY,
        launch_s=LAUNCH,
        per_peer_s=0,
        hop_latency_s=HOP,
    )
    model = ModelSpec(
        "tiny",
        layers=4,
        d_model=128,
        d_ff=512,
        experts=4,
        top_k=2,
        seq_len=128,
        batch_size=8,
        vocab=256,
        act_bytes=4,
        grad_bytes=4,
        param_bytes=4,
    )
    for i, policy in enumerate(("lina", "sequential", "ddp-overlap")):
        write_synthetic_run(
            tmp_path / policy,
            cluster,
            model,
            truth,
            TrainSpec(lina_a2a_chunks=2, coalesce_small=False, count_exchange=True),
            policy,
            steps=4,
            seed=i,
            cpu_count=2,
        )
    rep = calibrate(tmp_path)
    assert rep.fit.allreduce_slowdown_per_sharer == pytest.approx(0.3, abs=0.05)
    assert rep.fit.link_efficiency == pytest.approx(EFFICIENCY, rel=0.05)
    for row in rep.rows:
        assert abs(row["error"]) < 0.05, row


def test_core_sharing_exponents_with_and_without_all_to_all():
    """Compute per token grows as cores per rank shrink, by a power fitted for runs with
    all-to-alls and, apart, for runs without (ranks then compute side by side all step)."""
    from types import SimpleNamespace

    from lina.sim.calibration import fit_core_exponent

    def run(share, ep, tokens=2048):
        return SimpleNamespace(
            model=SimpleNamespace(tokens=tokens, layers=4, experts=4), core_share=share, ep_size=ep, workers=4
        )

    runs = [run(1.0, 2), run(0.5, 4), run(1.0, 1), run(0.5, 1), run(1.0, 2, 256), run(0.5, 4, 256)]
    base = {2048: 50e-6, 256: 80e-6}  # seconds per token and layer on a whole core
    exps = {True: 0.5, False: 1.0}
    obs = [
        SimpleNamespace(compute_s=base[r.model.tokens] * r.core_share ** -exps[r.ep_size > 1] * 4 * r.model.tokens)
        for r in runs
    ]
    with_a2a, without = fit_core_exponent(runs, obs)
    assert (with_a2a, without) == pytest.approx((0.5, 1.0))
    # no run without all-to-all: none for that kind
    assert fit_core_exponent(runs[:2], obs[:2]) == pytest.approx((0.5, None))
    with pytest.raises(ConfigError, match="allreduce_slowdown_in_compute"):
        ComputeProfile(**{**TRUTH.to_dict(), "allreduce_slowdown_in_compute": 1.0})


def test_compute_within_the_machine_cores():
    """Four ranks on two cores: a step whose passes last 1 s gives each rank 0.5 core-seconds.
    Compute simulated at 0.7 of a core for 0.8 s is 0.56 core-seconds of work, plus 0.2 of
    loopback copies (1 MB sent and 1 MB received at 10 MB/s per core): too much, so compute
    slows to 0.7 / 1.52; with no loopback rate fitted, to 0.7 / 1.12; passes of 2 s leave the
    speed as it was."""
    from types import SimpleNamespace

    from lina.sim.calibration import within_cores
    from lina.sim.engine import Task

    def result(end):
        tasks = [
            Task("f", "compute", "compute", duration_s=0.4, args={"phase": "fwd"}),
            Task("b", "compute", "compute", duration_s=0.4, args={"phase": "bwd"}),
            Task("a", "a2a", "a2a", args={"bytes": 1e6, "phase": "fwd"}),
        ]
        for t, (start, stop) in zip(tasks, [(0.0, 0.4), (end - 0.4, end), (0.4, 0.5)]):
            t.start_s, t.end_s = start, stop
        return SimpleNamespace(tasks=tasks)

    run = SimpleNamespace(core_share=0.5, ep_size=2, workers=4, workers_per_host=2, model=SimpleNamespace(experts=4))
    assert within_cores(SimpleNamespace(loopback_bytes_per_s=1e7), run, result(1.0), 0.7) == pytest.approx(0.7 / 1.52)
    assert within_cores(SimpleNamespace(loopback_bytes_per_s=None), run, result(1.0), 0.7) == pytest.approx(0.7 / 1.12)
    assert within_cores(SimpleNamespace(loopback_bytes_per_s=1e7), run, result(2.0), 0.7) == 0.7
    whole_cores = SimpleNamespace(**{**vars(run), "core_share": 1.0})
    assert within_cores(SimpleNamespace(loopback_bytes_per_s=1e7), whole_cores, result(1.0), 0.7) == 0.7


def test_loopback_rate_is_fitted_to_the_step_times(monkeypatch):
    """Runs whose all-to-alls stay partly inside hosts pick the loopback rate that predicts their
    step times best, on a grid around the samples' rate; other runs do not take part, and
    without such runs (or without a sampled rate) the fit is unchanged."""
    from types import SimpleNamespace

    from lina.sim.calibration import fitting as cal

    def run(per_host, measured):
        return SimpleNamespace(
            ep_size=4, workers=4, workers_per_host=per_host, model=SimpleNamespace(experts=4), measured_step_s=measured
        )

    true_rate = 4e8 * 2**1.5  # on the grid: 2.83x the sampled 400 MB/s
    # a step costs 1 s plus 1 GB of loopback copies at the rate: the measured runs ran at the true rate
    monkeypatch.setattr(cal, "predict", lambda f, r: SimpleNamespace(step_s=1.0 + 1e9 / f.loopback_bytes_per_s))
    local = [run(2, 1.0 + 1e9 / true_rate) for _ in range(3)]
    flat = run(1, 50.0)  # no loopback all-to-all: its (badly predicted) step must not sway the fit
    fitted = SimpleNamespace(loopback_bytes_per_s=4e8, loopback_step_runs=0)
    monkeypatch.setattr(cal, "replace", lambda obj, **kw: SimpleNamespace(**{**vars(obj), **kw}))
    out = cal.fit_loopback_to_steps(fitted, local + [flat])
    assert out.loopback_bytes_per_s == pytest.approx(true_rate) and out.loopback_step_runs == 3
    assert cal.fit_loopback_to_steps(fitted, [flat]) is fitted
    none = SimpleNamespace(loopback_bytes_per_s=None, loopback_step_runs=0)
    assert cal.fit_loopback_to_steps(none, local) is none


def test_fit_follows_each_runs_routing_skew(tmp_path):
    """Runs of one shape whose routing differs (a hot receiver moving 1.6x the mean rank's bytes,
    or none) take different times; the skew read from each run's timelines accounts for it."""
    from dataclasses import replace

    from lina.sim.calibration import fit, predict

    cluster = ClusterSpec(
        hosts=4,
        gpus_per_host=1,
        link_gbps=0.2,
        link_efficiency=EFFICIENCY,
        launch_s=LAUNCH,
        per_peer_s=0,
        hop_latency_s=HOP,
    )
    model = ModelSpec(
        "tiny",
        layers=4,
        d_model=128,
        d_ff=512,
        experts=4,
        top_k=2,
        seq_len=128,
        batch_size=8,
        vocab=256,
        act_bytes=4,
        grad_bytes=4,
        param_bytes=4,
    )
    for i, (skew, policy) in enumerate(
        [(1.0, "ddp-overlap"), (1.6, "ddp-overlap"), (1.0, "sequential"), (1.6, "sequential"), (1.3, "lina")]
    ):
        write_synthetic_run(
            tmp_path / f"{policy}-{skew}",
            cluster,
            model,
            TRUTH,
            TrainSpec(lina_a2a_chunks=2, coalesce_small=False, count_exchange=True, a2a_skew=skew),
            policy,
            steps=4,
            seed=i,
        )
    runs = find_runs(tmp_path)
    assert sorted(round(r.a2a_skew, 6) for r in runs) == [1.0, 1.0, 1.3, 1.6, 1.6]
    fitted = fit(runs)
    assert fitted.link_efficiency == pytest.approx(EFFICIENCY, rel=0.05)
    errors = {r.path.name: predict(fitted, r).step_s / r.measured_step_s - 1 for r in runs}
    assert max(abs(e) for e in errors.values()) < 0.03, errors
    # the same runs read as uniform miss the skewed one by far more
    hot = next(r for r in runs if r.path.name == "ddp-overlap-1.6")
    uniform = replace(hot, train=replace(hot.train, a2a_skew=1.0))
    assert predict(fitted, uniform).step_s / hot.measured_step_s - 1 < -0.15

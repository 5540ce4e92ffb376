"""The benchmarks' --quick modes run end to end and write their JSON and plots (real runs; the
numbers are measured, so only their presence and sanity are asserted here)."""

import json
import os
import shutil

import pytest

from conftest import run_lina
from lina.bench.peers import PEER_NAMES, deepspeed_import_problem
from lina.bench.plan import InferBenchPlan, TrainBenchPlan
from lina.cluster.spec import format_rate
from lina.data.routing_trace import synthetic_trace

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tc") is None, reason="needs root and tc for the emulated cluster"
)


@pytest.mark.slow
def test_bench_layer_quick(tmp_path):
    out = tmp_path / "layer.json"
    res = run_lina("bench", "layer", "--quick", "--json", str(out), timeout=120)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    # a measured share: noise on a busy machine can push it a little below zero
    assert data["median_ms"]["moe"] > 0 and -0.5 < data["routing_overhead_share_of_expert_time"] < 5


@needs_netns
@pytest.mark.netns
@pytest.mark.slow
def test_bench_train_quick(tmp_path):
    out = tmp_path / "train.json"
    res = run_lina("bench", "train", "--quick", "--json", str(out), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in ("link", "a2a_share_ddp_overlap", "allreduce_to_a2a_bytes"):
        assert key in data["regime"]
    cfg = data["configs"][0]
    # routing skew read back from the run folders' timelines: 4 experts on 4 ranks, top-2
    assert cfg["regime"]["a2a_skew_ddp_overlap"] >= 1.0 and cfg["policies"]["lina"]["a2a_skew"] >= 1.0
    assert "a2a skew" in res.stdout
    assert cfg["layout"] == "flat" and cfg["lower_bound_s"] > 0
    for name in ("ddp-overlap", "sequential", "tutel", "lina"):
        assert cfg["policies"][name]["step_time_s_median"] > 0
        assert cfg["policies"][name]["bwd_a2a_s_median"] > 0
        assert name in cfg["speedup_vs_ddp_overlap"]
    assert out.with_suffix(".png").exists()
    assert (tmp_path / "runs" / "flat-e4-lina" / "summary.json").exists()
    plan = TrainBenchPlan.load(tmp_path / "plan-flat.json")  # what the workers ran, readable and typed
    assert plan.layout == "flat" and plan.experts == (4,) and "lina" in plan.policies
    problem = deepspeed_import_problem()
    if problem is not None:  # without the package the default runs no peers and says why
        assert data["peers"] == [] and "peers: none (deepspeed does not import" in res.stdout
        return
    # real DeepSpeed-MoE rows beside lina's, measured the same way, and their loss at equal steps
    assert data["peers"] == list(PEER_NAMES) and data["policies"][-2:] == list(PEER_NAMES)
    for name in PEER_NAMES:
        p = cfg["policies"][name]
        assert p["step_time_s_median"] > 0 and p["bwd_a2a_s_median"] > 0 and p["allreduce_s_median"] > 0
        assert cfg["speedup_vs_peers"][name]["lina"] > 0
        assert 0 < cfg["loss_after_steps"][name] < 10
        # spans for the report's skew; no summary.json, so simulator calibration leaves the peers out
        assert (tmp_path / "runs" / f"flat-e4-{name}" / "timeline-rank0.jsonl").exists()
        assert not (tmp_path / "runs" / f"flat-e4-{name}" / "summary.json").exists()
    assert cfg["loss_after_steps"]["steps"] == 3 and 0 < cfg["loss_after_steps"]["lina"] < 10
    assert "over real deepspeed-zero0" in res.stdout


@needs_netns
@pytest.mark.netns
@pytest.mark.slow
def test_bench_train_quick_on_the_paper_cluster(tmp_path):
    out = tmp_path / "train.json"
    trace = tmp_path / "trace.npz"
    synthetic_trace(4000, 4, 4, top_k=2, skew=1.3, seed=3).save(trace)  # BENCH_MODEL: 4 layers, 4 experts
    res = run_lina(
        "bench",
        "train",
        "--quick",
        "--cluster",
        "paper",
        "--routing-trace",
        str(trace),
        "--bounds",
        "lina",
        "--policies",
        "ddp-overlap,lina",
        "--peers",
        "deepspeed-zero0" if deepspeed_import_problem() is None else "none",
        "--json",
        str(out),
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "4 hosts x 1 worker" in res.stdout  # scaled down on this machine, and it says so
    data = json.loads(out.read_text())
    regime = data["regime"]
    assert regime["cluster"] == "paper" and regime["compute"] == "a100" and regime["link"] == "100gbit"
    assert regime["intra"] == "2400gbit"
    assert regime["emulated_link"] == format_rate(int(100e9 / regime["dilation"]))
    assert "host link 100gbit (emulated" in res.stdout
    # the measured lower bound runs beside the policies: lina with its gradient allreduce off
    cfg = data["configs"][0]
    peers = ["deepspeed-zero0"] if deepspeed_import_problem() is None else []
    assert (
        set(cfg["policies"]) == {"ddp-overlap", "lina", "lina/no-sync", *peers}
        and cfg["policies"]["lina/no-sync"]["allreduce_s_median"] == 0
    )
    if peers:  # the real DeepSpeed in the same device time, routed by the same trace; no loss in device time
        assert cfg["policies"]["deepspeed-zero0"]["a2a_share"] > 0 and "loss_after_steps" not in cfg
        assert cfg["speedup_vs_peers"]["deepspeed-zero0"]["lina"] > 0
    assert cfg["measured_bound_s"]["lina"] > 0 and 0 <= cfg["device_time"]["host_bound_share"]
    assert "measured lower bound of lina" in res.stdout and "device time: the emulated a100" in res.stdout
    # each policy's run folder says it ran in device time, on the emulated link, for lina sim --calibrate
    summary = json.loads((tmp_path / "runs" / "paper-e4-lina" / "summary.json").read_text())
    assert summary["device_time"]["dilation"] == regime["dilation"]
    assert summary["setup"]["link_bps"] == pytest.approx(100e9 / regime["dilation"])


@needs_netns
@pytest.mark.netns
@pytest.mark.slow
def test_bench_infer_quick(tmp_path):
    out = tmp_path / "infer.json"
    res = run_lina("bench", "infer", "--quick", "--json", str(out), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    for name in ("static", "eplb", "lina", "oracle"):
        p = data["policies"][name]
        assert 0 < p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"]
        assert name in data["p95_speedup_vs_static"]
    assert 0 <= data["estimator"]["top2_accuracy"] <= 1 and 0 <= data["estimator"]["replan_rate"] <= 1
    for key in ("link", "skew", "batch_tokens"):
        assert key in data["regime"]
    assert out.with_suffix(".png").exists()
    assert [r["trace"] for r in data["runs"]][0] == "own-model"
    plan = InferBenchPlan.load(tmp_path / "own-model" / "plan.json")
    assert set(plan.policies) == {"static", "eplb", "lina", "oracle"} and plan.world >= 2


@pytest.mark.parametrize(
    "args, field",
    [
        (["--layouts", "ring"], "layouts"),
        (["--experts", "four"], "experts"),
        (["--experts", "0"], "experts"),
        (["--batch-size", "0"], "batch-size"),
        (["--peers", "deepspeed-zero3"], "peers"),
    ],
)
@pytest.mark.slow  # starts the CLI in a subprocess (a second or more each)
def test_bench_train_rejects_bad_options_before_starting(args, field, tmp_path):
    res = run_lina("bench", "train", *args, "--json", str(tmp_path / "t.json"), timeout=60)
    assert res.returncode == 2
    assert f"invalid {field}" in res.stderr and "Fix:" in res.stderr
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize(
    "args, field",
    [
        (["--dilation", "4"], "dilation"),  # dilation without a device
        (["--compute", "a100", "--dilation", "0.001"], "emulate.link"),  # 100mbit x 1000: beyond tc
    ],
)
@pytest.mark.slow  # starts the CLI in a subprocess (a second or more each)
def test_bench_infer_rejects_bad_compute_options_before_starting(args, field, tmp_path):
    res = run_lina("bench", "infer", *args, "--json", str(tmp_path / "i.json"), timeout=60)
    assert res.returncode == 2, res.stderr
    assert f"invalid {field}" in res.stderr and "Fix:" in res.stderr
    assert not (tmp_path / "i.json").exists()

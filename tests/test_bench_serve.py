"""``lina bench serve --quick``: every shape and placement reports prefill and decode latency
percentiles and tokens/s, the regime, lina's plan sources and the estimator's accuracy."""

import json
import os
import shutil

import pytest
import torch

from lina.bench.serve import POLICIES, resumable
from lina.bench.stats import percentile
from lina.cli import main
from lina.placement.metrics import token_topk_recall


def test_topk_recall_counts_the_real_experts_found():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    real = torch.tensor([[0, 2], [3, 2]])
    assert token_topk_recall(probs, real).tolist() == [0.5, 1.0]


@pytest.mark.slow
def test_bench_serve_quick_reports_every_shape_and_policy(tmp_path, capsys):
    out = tmp_path / "bench-serve.json"
    assert main(["bench", "serve", "--quick", "--emulate", "none", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["regime"]["compute"] == "real" and data["regime"]["link"].startswith("loopback")
    shapes = {r["shape"]: r for r in data["runs"]}
    assert {"own", "fine"} <= set(shapes)
    fine = shapes["fine"]
    assert fine["experts"] == 64 and fine["top_k"] == 8
    for r in data["runs"]:
        assert set(r["policies"]) == set(POLICIES)
        for s in r["policies"].values():
            for phase in ("prefill", "decode"):
                x = s[phase]
                assert 0 < x["p50_ms"] <= x["p95_ms"] <= x["p99_ms"] and x["tokens_per_s"] > 0
        steps = 2 * (1 + 6)  # rounds x (prefill + decode steps), after warm-up
        lina = r["policies"]["lina"]["sources"]
        assert lina[0] == {"real": 3 * 7} and all(sum(v for k, v in s.items() if k != "replanned") == 21 for s in lina)
        assert r["policies"]["static"]["sources"] == [{"static": 21}] * r["layers"]
        arms = r["policies"]["lina-auto"]["arms"]  # prefill and decode batches are classed apart
        # every batch's latency is learnt at the next batch's first layer: all but the last
        assert len(arms) == 2 and sum(a["batches"] for c in arms.values() for a in c.values()) == 21 - 1
        acc = r["estimator_topk_accuracy"]
        for phase in ("prefill", "decode"):
            assert 0 <= acc["path"][phase]["hit"] <= acc["path"][phase]["recall"] <= 1
        assert steps == 14
    printed = capsys.readouterr().out
    assert "regime: link loopback" in printed and "decode" in printed and "(paper 54-60% hit rate at l=3)" in printed
    assert "lina-auto decode p95:" in printed and "the better of static and eplb" in printed
    assert (tmp_path / "bench-serve.png").is_file() or "matplotlib" not in printed
    # a second run with --resume keeps every finished shape of the same settings and serves nothing again
    first = {r["shape"]: r["policies"] for r in data["runs"]}
    assert main(["bench", "serve", "--quick", "--emulate", "none", "--resume", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing") == len(first)
    assert {r["shape"]: r["policies"] for r in json.loads(out.read_text())["runs"]} == first


def test_resume_needs_the_same_plan_and_a_result(tmp_path):
    plan = {"layers": 4, "d_model": 64}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert not resumable(tmp_path, plan)  # no result yet: the run stopped before the end
    (tmp_path / "result.json").write_text("{}")
    assert resumable(tmp_path, plan)
    assert not resumable(tmp_path, plan | {"d_model": 128})  # other settings: served again
    assert not resumable(tmp_path / "missing", plan)


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tc") is None or shutil.which("ip") is None,
    reason="needs root, tc and ip to build the emulated cluster",
)
def test_bench_serve_quick_on_the_emulated_cluster_in_device_time(tmp_path, capsys):
    out = tmp_path / "bench-serve.json"
    argv = ["bench", "serve", "--quick", "--shapes", "own", "--json", str(out)]
    argv += ["--emulate", "hosts=2,link=1gbit,workers_per_host=2", "--compute", "a100", "--dilation", "20"]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    reg = data["regime"]
    assert reg["compute"] == "a100" and reg["dilation"] == 20 and reg["hosts"] == 2
    assert reg["link"] == "1gbit" and reg["emulated_link"] == "50mbit"
    assert [r["shape"] for r in data["runs"]] == ["own"]
    printed = capsys.readouterr().out
    assert "compute a100 x dilation 20" in printed and "latencies in real-cluster ms: measured / 20" in printed
    raw = json.loads((tmp_path / "own" / "result.json").read_text())
    for name, s in data["runs"][0]["policies"].items():  # real-cluster units: each measured step / K
        measured_ms = [v * 1e3 for v in raw[name]["prefill_s"]]
        assert s["prefill"]["p50_ms"] == pytest.approx(percentile(measured_ms, 50) / 20)


def test_bad_settings_exit_2_before_anything_runs(tmp_path, capsys):
    base = ["bench", "serve", "--quick", "--json", str(tmp_path / "b.json")]
    assert main([*base, "--shapes", "own,huge"]) == 2
    assert "unknown shape(s) huge" in capsys.readouterr().err
    assert main([*base, "--dilation", "10"]) == 2
    assert "dilation" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()

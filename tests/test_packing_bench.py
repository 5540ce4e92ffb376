"""`lina bench train`'s packing figures, on synthetic spans (no processes): compute busy during
all-to-all, and the report of the packing chosen."""

import json

import pytest

from lina.bench.train_report import analyse, plot, print_report
from lina.bench.train_worker import _busy_share, step_metrics
from lina.obs.timeline import intersection_length
from lina.obs.timeline import Timeline


def test_intersection_length():
    assert intersection_length([(0, 10)], [(2, 3), (5, 7)]) == pytest.approx(3)
    assert intersection_length([(0, 2), (1, 4)], [(3, 6)]) == pytest.approx(1)  # overlapping a2a micro-ops count once
    assert intersection_length([(0, 1)], [(2, 3)]) == 0
    assert intersection_length([], [(0, 1)]) == 0


def test_compute_busy_during_all_to_all():
    tl = Timeline(0)
    tl.record("moe0.dispatch", "a2a", 0.0, 4.0, phase="fwd", micro_op=0)
    tl.record("moe0.dispatch", "a2a", 1.0, 6.0, phase="fwd", micro_op=1)
    tl.record("moe0.experts", "compute", 4.0, 5.0, micro_op=0)  # overlaps micro-op 1 in flight
    tl.record("moe0.experts.bwd", "compute", 5.5, 8.0, micro_op=0)  # overlaps 0.5
    tl.record("forward", "compute", 0.0, 9.0)  # not an expert span
    tl.record("step", "step", 0.0, 10.0, step=0)
    spans = tl.spans()
    m = step_metrics(spans, spans[-1])
    assert m["a2a_s"] == pytest.approx(6.0)
    assert m["compute_busy_in_a2a_s"] == pytest.approx(1.5)
    assert _busy_share([m, m]) == pytest.approx(0.25)
    assert _busy_share([{"a2a_s": 0.0, "compute_busy_in_a2a_s": 0.0}]) is None  # pure data parallelism


def _policy(step_s, a2a_s, busy, per_rank):
    return {"step_time_s": step_s, "step_time_s_min": step_s, "step_time_s_max": step_s, "bwd_a2a_s": a2a_s / 2,
            "allreduce_s": 0.1, "sync_wait_s": 0.05, "a2a_s": a2a_s, "partition_s": 0.0, "a2a_bytes": 1e6, "steps": 2,
            "experts_per_rank": per_rank, "compute_busy_in_a2a": busy}


def test_report_carries_packing_and_busy_share(tmp_path, capsys):
    entry = {
        "experts": 8, "chunk_mb": 1.0, "chunk_sweep_s": None, "dense_grad_bytes": 1e6,
        "policies": {"deepspeed": _policy(1.0, 0.4, 0.0, 2), "sequential": _policy(1.1, 0.35, 0.0, 2),
                     "lina": _policy(0.8, 0.3, 0.35, 2), "lina+packing": _policy(0.6, 0.1, 0.8, 4)},
        "packing": {"experts_per_rank": 4, "ep_size": 2, "world": 4, "window_steps": 2,
                    "decisions": [{"step": 6, "experts_per_rank": 2, "new_experts_per_rank": 4, "reason": "FFN 1 ms vs all-to-all 3 ms per micro-op: pack"},
                                  {"step": 8, "experts_per_rank": 4, "new_experts_per_rank": 4, "reason": "no bubble, keep"}]},
    }
    config = analyse(entry, "hierarchical", 100_000_000, 2, 2)
    assert config["policies"]["lina+packing"]["experts_per_rank"] == 4
    assert config["policies"]["lina+packing"]["compute_busy_in_a2a"] == 0.8
    assert config["packing"]["experts_per_rank"] == 4
    assert config["speedup_vs_deepspeed"]["lina+packing"] == pytest.approx(1 / 0.6)
    result = {"policies": list(entry["policies"]), "configs": [config]}
    json.dumps(result)
    print_report(result)
    text = capsys.readouterr().out
    assert "packing chosen: 4 experts per rank (EP size 2 of 4)" in text and "80.0%" in text and "79-86%" in text
    plot(result, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 0

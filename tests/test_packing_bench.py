"""`lina bench train`'s packing figures, on synthetic spans (no processes): compute busy during
all-to-all, and the report of the packing chosen."""

import json

import pytest

from lina.bench.train_report import analyse, plot, print_report
from lina.bench.train_worker import _busy_share, step_metrics
from lina.obs.timeline import Timeline, intersection_length


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
    return {
        "step_time_s": step_s,
        "step_time_s_min": step_s,
        "step_time_s_max": step_s,
        "bwd_a2a_s": a2a_s / 2,
        "allreduce_s": 0.1,
        "sync_wait_s": 0.05,
        "a2a_s": a2a_s,
        "partition_s": 0.0,
        "a2a_bytes": 1e6,
        "steps": 2,
        "experts_per_rank": per_rank,
        "compute_busy_in_a2a": busy,
    }


def test_report_carries_packing_and_busy_share(tmp_path, capsys):
    entry = {
        "experts": 8,
        "chunk_mb": 1.0,
        "chunk_sweep_s": None,
        "dense_grad_bytes": 1e6,
        "policies": {
            "ddp-overlap": _policy(1.0, 0.4, 0.0, 2),
            "sequential": _policy(1.1, 0.35, 0.0, 2),
            "lina": _policy(0.8, 0.3, 0.35, 2),
            "lina+packing": _policy(0.6, 0.1, 0.8, 4),
        },
        "packing": {
            "experts_per_rank": 4,
            "ep_size": 2,
            "world": 4,
            "window_steps": 2,
            "decisions": [
                {
                    "step": 6,
                    "experts_per_rank": 2,
                    "new_experts_per_rank": 4,
                    "reason": "FFN 1 ms vs all-to-all 3 ms per micro-op: pack",
                },
                {"step": 8, "experts_per_rank": 4, "new_experts_per_rank": 4, "reason": "no bubble, keep"},
            ],
        },
    }
    config = analyse(entry, "hierarchical", 100_000_000, 2, 2, skews={"ddp-overlap": 1.4, "lina": 1.3})
    assert config["policies"]["lina"]["a2a_skew"] == 1.3 and config["policies"]["sequential"]["a2a_skew"] is None
    assert config["policies"]["lina+packing"]["experts_per_rank"] == 4
    assert config["policies"]["lina+packing"]["compute_busy_in_a2a"] == 0.8
    assert config["packing"]["experts_per_rank"] == 4
    assert config["speedup_vs_ddp_overlap"]["lina+packing"] == pytest.approx(1 / 0.6)
    result = {"policies": list(entry["policies"]), "configs": [config]}
    json.dumps(result)
    print_report(result)
    text = capsys.readouterr().out
    assert "packing chosen: 4 experts per rank (EP size 2 of 4)" in text and "80.0%" in text and "79-86%" in text
    assert "a2a skew 1.40" in text
    plot(result, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_round_schedule_settles_only_after_the_experts_move():
    from lina.bench.train_worker import round_schedule

    policies = ["ddp-overlap", "lina", "lina+packing"]
    layout = {"ddp-overlap": 4, "lina": 4, "lina+packing": 1}
    rnd = round_schedule(policies, layout, 4, steps_per_round=2, settle=3)
    assert rnd == [("ddp-overlap", [True, True]), ("lina", [True, True]), ("lina+packing", [False] * 3 + [True, True])]
    # the next round starts packed: deepspeed moves the experts back, so it settles first
    again = round_schedule(policies, layout, 1, steps_per_round=2, settle=3)
    assert again[0] == ("ddp-overlap", [False] * 3 + [True, True]) and again[1] == ("lina", [True, True])
    # nothing packs (many experts per rank already): no settling at all
    flat = round_schedule(policies, {p: 4 for p in policies}, 4, steps_per_round=1, settle=5)
    assert all(steps == [True] for _, steps in flat)
    # ... unless the warm-up's packing search has just moved them (there and back)
    after_search = round_schedule(policies, {p: 4 for p in policies}, 4, steps_per_round=1, settle=2, moved=True)
    assert [steps for _, steps in after_search] == [[False, False, True], [True], [True]]


def test_report_without_the_ddp_overlap_baseline(tmp_path, capsys):
    entry = {
        "experts": 4,
        "chunk_mb": 0.25,
        "chunk_sweep_s": None,
        "dense_grad_bytes": 1e6,
        "policies": {
            "lina": _policy(0.8, 0.3, 0.35, 1),
            "lina+packing": _policy(0.6, 0.0, None, 4) | {"settle_steps": 6},
        },
    }
    config = analyse(entry, "flat", 400_000_000, 4, 1)
    assert config["regime"]["a2a_share_ddp_overlap"] is None and "speedup_vs_ddp_overlap" not in config
    assert config["regime"]["a2a_skew_ddp_overlap"] is None and config["policies"]["lina"]["a2a_skew"] is None
    assert config["policies"]["lina+packing"]["settle_steps"] == 6
    result = {
        "policies": list(entry["policies"]),
        "configs": [config],
        "model": {"top_k": 8, "hf_model": "/x/qwen3_moe"},
    }
    print_report(result)
    text = capsys.readouterr().out
    assert "n/a (ddp-overlap not among the policies)" in text and "nan" not in text
    assert "(1/rank), top-8, qwen3_moe |" in text  # the model's own top-k and checkpoint, not a fixed top-2
    plot(result, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 0

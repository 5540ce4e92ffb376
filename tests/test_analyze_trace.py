"""`lina analyze trace` and the measures behind it, on traces whose answers are known."""

import json

import numpy as np
import pytest

from lina.cli import main
from lina.data.routing_trace import RoutingTrace, synthetic_trace
from lina.infer.analysis import accuracy_by_path_len, inter_layer_affinity, popularity_skew, trace_splits
from lina.placement.estimators import PathEstimator


def _top1_trace(columns: list[list[int]], experts: int = 4) -> RoutingTrace:
    ex = np.array(columns).T[:, :, None]
    t = ex.shape[0]
    return RoutingTrace(ex, np.zeros(t), np.arange(t), num_experts=experts, top_k=1)


def test_skew_counts_ratio_and_cv():
    tr = _top1_trace([[0, 0, 0, 0, 1, 1, 2, 3], [0, 1, 2, 3, 0, 1, 2, 3]])
    skew = popularity_skew(tr)
    assert skew["top1_counts"][0] == [4, 2, 1, 1]
    assert skew["max_min_ratio"] == [4.0, 1.0]
    assert skew["cv"][1] == pytest.approx(0.0)
    assert skew["cv"][0] == pytest.approx(np.std([4, 2, 1, 1]) / 2.0)
    never = popularity_skew(_top1_trace([[0, 0, 1, 1]]))
    assert never["max_min_ratio"] == [None] and never["layers_with_unpicked_expert"] == 1


def test_affinity_matches_a_hand_count():
    tr = _top1_trace([[0, 0, 0, 1, 1], [2, 2, 3, 3, 3]])
    aff = inter_layer_affinity(tr)
    assert aff["top1"] == [pytest.approx(4 / 5)]  # group 0 -> {2,2,3}: 2; group 1 -> {3,3}: 2
    assert aff["top2"] == [pytest.approx(1.0)]
    assert aff["baseline_top1"] == [pytest.approx(3 / 5)]
    assert aff["baseline_top2"] == [pytest.approx(1.0)]


def test_accuracy_by_path_len_scores_every_length_on_the_same_layers():
    tr = synthetic_trace(300, 5, 8, top_k=1, affinity=0.95, seed=0, tokens_per_seq=50)
    fit, test = tr.split(0.5, by="seq")
    res = accuracy_by_path_len(fit, test, [1, 2], {"path": lambda l, t: PathEstimator(l).fit(t)}, batch_tokens=50)
    assert res["layers"] == [2, 3, 4] and res["path_lens"] == [0, 1, 2]
    assert res["path"]["1"]["layers"] == [2, 3, 4]
    assert res["path"]["1"]["token_topk"] > res["path"]["0"]["token_topk"] + 0.3  # the path helps a lot here


def test_splits_for_two_sequences_include_the_reversed_fold():
    tr = synthetic_trace(40, 2, 4, tokens_per_seq=20)
    splits = trace_splits(tr)
    assert set(splits) == {"seq", "seq-reversed", "position"}
    fit, test = splits["seq"]
    assert set(fit.seq_id) == {0} and set(test.seq_id) == {1}
    assert splits["seq-reversed"][0].num_tokens == test.num_tokens


@pytest.mark.slow  # starts the CLI in a subprocess (a second or more each)
def test_cli_writes_json_and_plots(tmp_path, capsys):
    trace = synthetic_trace(240, 5, 4, top_k=2, affinity=0.8, seed=1, tokens_per_seq=60).save(tmp_path / "t.npz")
    out = tmp_path / "report"
    code = main(
        [
            "analyze",
            "trace",
            str(trace),
            "--out",
            str(out),
            "--path-lens",
            "1,2",
            "--devices",
            "2",
            "--batch-tokens",
            "20",
            "--estimators",
            "path,online-path",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "affinity:" in printed and "balance path/N=2" in printed
    result = json.loads((out / "analysis.json").read_text())
    assert result["headline_split"] == "seq"
    assert set(result["accuracy"]) == {"seq", "position"}
    for split in result["accuracy"].values():
        for name in ("path", "online-path"):
            for score in split[name].values():
                assert 0.0 <= score["token_topk"] <= 1.0 and 0.0 <= score["batch_match"] <= 1.0
    bal = result["balance"]["path/N=2"]
    assert bal["mean"]["oracle"] <= bal["mean"]["static"] + 1e-9
    for png in ("skew_per_layer.png", "affinity_per_layer.png", "accuracy_vs_path_len.png", "placement_balance.png"):
        assert (out / png).stat().st_size > 1000


def test_cli_errors_exit_with_a_message(tmp_path, capsys):
    assert main(["analyze", "trace", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "Fix:" in err
    trace = synthetic_trace(20, 2, 4, tokens_per_seq=10).save(tmp_path / "t.npz")
    assert main(["analyze", "trace", str(trace), "--estimators", "crystal-ball"]) == 2
    assert "--estimators" in capsys.readouterr().err

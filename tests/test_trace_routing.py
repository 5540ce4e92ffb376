"""Routing traces: validation, the .npz format, splits, and the vLLM/Mixtral .jsonl reader."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lina.data.routing_trace import RoutingTrace, load_trace, read_mixtral_jsonl, synthetic_trace
from lina.errors import ConfigError, LinaError

MIXTRAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mixtral-8x7b-gsm8k-routing.jsonl"


def _small(tokens=6, layers=3, experts=4, k=2, seed=0, probs=True):
    rng = np.random.default_rng(seed)
    ex = np.stack([np.stack([rng.permutation(experts)[:k] for _ in range(layers)]) for _ in range(tokens)])
    return RoutingTrace(
        experts=ex,
        seq_id=np.arange(tokens) // 3,
        token_idx=np.arange(tokens) % 3,
        num_experts=experts,
        top_k=k,
        gate_probs=rng.random((tokens, layers, k)) if probs else None,
        source="unit",
    )


def test_fields_are_converted_to_documented_dtypes():
    tr = _small()
    assert tr.experts.dtype == np.int16 and tr.experts.shape == (6, 3, 2)
    assert tr.seq_id.dtype == np.int32 and tr.token_idx.dtype == np.int32
    assert tr.gate_probs.dtype == np.float32
    assert tr.expert_tensor().dtype == torch.long
    assert tr.top1().shape == (6, 3)
    assert tr.slot_counts().sum().item() == 6 * 3 * 2


def test_torch_inputs_are_accepted():
    tr = RoutingTrace(torch.zeros(2, 1, 1, dtype=torch.long), torch.zeros(2), torch.arange(2), num_experts=2, top_k=1)
    assert tr.num_tokens == 2 and tr.num_layers == 1


@pytest.mark.parametrize(
    "change, field",
    [
        ({"num_experts": 2}, "experts"),  # ids up to 3 are out of range
        ({"top_k": 3}, "top_k"),
        ({"seq_id": np.zeros(5)}, "seq_id"),
        ({"gate_probs": np.zeros((6, 3, 1))}, "gate_probs"),
        ({"num_experts": 0}, "num_experts"),
    ],
)
def test_invalid_traces_name_the_field(change, field):
    tr = _small()
    kwargs = dict(
        experts=tr.experts, seq_id=tr.seq_id, token_idx=tr.token_idx, num_experts=4, top_k=2, gate_probs=tr.gate_probs
    )
    kwargs.update(change)
    with pytest.raises(ConfigError) as err:
        RoutingTrace(**kwargs)
    assert err.value.field == field


def test_duplicate_expert_in_one_layer_is_rejected():
    ex = np.array([[[1, 1]]])
    with pytest.raises(ConfigError, match="same expert twice"):
        RoutingTrace(ex, [0], [0], num_experts=4, top_k=2)


@pytest.mark.parametrize("probs", [True, False])
def test_npz_round_trip_is_exact_and_pickle_free(tmp_path, probs):
    tr = _small(probs=probs)
    path = tr.save(tmp_path / "t.npz")
    with np.load(path, allow_pickle=False) as data:  # would raise if anything needed pickle
        assert set(data.files) >= {"experts", "seq_id", "token_idx", "meta"}
    back = RoutingTrace.load(path)
    assert np.array_equal(back.experts, tr.experts)
    assert np.array_equal(back.seq_id, tr.seq_id) and np.array_equal(back.token_idx, tr.token_idx)
    assert (back.num_experts, back.top_k, back.source) == (4, 2, "unit")
    if probs:
        assert np.array_equal(back.gate_probs, tr.gate_probs)
    else:
        assert back.gate_probs is None
    assert np.array_equal(load_trace(path).experts, tr.experts)


def test_save_needs_npz_suffix_and_load_rejects_foreign_files(tmp_path):
    with pytest.raises(ConfigError):
        _small().save(tmp_path / "t.bin")
    other = tmp_path / "other.npz"
    np.savez(other, meta=np.array(json.dumps({"format": "something-else"})))
    with pytest.raises(LinaError, match="not a lina routing trace"):
        RoutingTrace.load(other)
    with pytest.raises(LinaError, match="not found"):
        RoutingTrace.load(tmp_path / "missing.npz")
    with pytest.raises(ConfigError):
        load_trace(tmp_path / "trace.csv")


def test_split_by_sequence_holds_out_whole_sequences():
    tr = synthetic_trace(100, 3, 4, tokens_per_seq=10, seed=1)
    fit, held = tr.split(0.7, by="seq")
    assert set(np.unique(fit.seq_id)) == set(range(7)) and set(np.unique(held.seq_id)) == set(range(7, 10))
    assert fit.num_tokens + held.num_tokens == 100


def test_split_by_position_takes_the_start_of_every_sequence():
    tr = synthetic_trace(40, 2, 4, tokens_per_seq=10, seed=1).subset(np.random.default_rng(0).permutation(40))
    fit, held = tr.split(0.7, by="position")
    assert fit.num_tokens == 28 and held.num_tokens == 12
    for s in range(4):
        assert fit.token_idx[fit.seq_id == s].tolist() == list(range(7))
        assert held.token_idx[held.seq_id == s].tolist() == [7, 8, 9]


def test_split_rejects_bad_arguments():
    tr = synthetic_trace(10, 2, 4, tokens_per_seq=10)
    with pytest.raises(ConfigError):
        tr.split(0.7, by="seq")  # one sequence only
    with pytest.raises(ConfigError):
        tr.split(1.0)
    with pytest.raises(ConfigError):
        tr.split(0.5, by="colour")


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_jsonl_reader_keeps_complete_tokens_in_order(tmp_path):
    recs = []
    for pid, tok in [(1, 0), (0, 1), (0, 0)]:
        for layer in range(3):
            recs.append(
                {"problem_id": pid, "token_idx": tok, "layer": layer, "experts": [layer, 3], "gating_probs": [0.7, 0.3]}
            )
    recs.append(
        {"problem_id": 0, "token_idx": 2, "layer": 0, "experts": [1, 2], "gating_probs": [0.6, 0.4]}
    )  # incomplete
    tr = read_mixtral_jsonl(_write_jsonl(tmp_path / "r.jsonl", recs))
    assert tr.num_tokens == 3 and tr.num_layers == 3 and tr.top_k == 2 and tr.num_experts == 4
    assert list(zip(tr.seq_id.tolist(), tr.token_idx.tolist())) == [(0, 0), (0, 1), (1, 0)]
    assert tr.experts[0, :, 0].tolist() == [0, 1, 2]
    assert np.allclose(tr.gate_probs[..., 0], 0.7)


def test_jsonl_reader_errors_are_clear(tmp_path):
    with pytest.raises(LinaError, match="Mario928/speculative-moe"):
        read_mixtral_jsonl(tmp_path / "absent.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem_id": 0, "layer": 0}\n')
    with pytest.raises(LinaError, match="bad.jsonl:1"):
        read_mixtral_jsonl(bad)


@pytest.mark.skipif(not MIXTRAL.is_file(), reason="shared Mixtral routing trace not present")
def test_real_mixtral_trace_shape():
    tr = load_trace(MIXTRAL)
    assert (tr.num_tokens, tr.num_layers, tr.num_experts, tr.top_k) == (244, 32, 8, 2)
    assert sorted(np.unique(tr.seq_id).tolist()) == [0, 1]
    assert tr.gate_probs is not None and np.all(tr.gate_probs[..., 0] >= tr.gate_probs[..., 1])


def test_synthetic_trace_has_affinity():
    tr = synthetic_trace(2000, 4, 8, top_k=2, affinity=0.9, seed=3)
    top1 = tr.top1()
    # The most common successor of each expert is followed far more often than 1/E.
    follow = 0
    for e in range(8):
        nxt = top1[top1[:, 0] == e, 1]
        follow += int(torch.bincount(nxt, minlength=8).max())
    assert follow / 2000 > 0.8
    assert (tr.experts[:, :, 0] != tr.experts[:, :, 1]).all()

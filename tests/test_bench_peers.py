"""The real DeepSpeed-MoE peer of ``lina bench train``: it trains from lina's initial model on lina's
batches, its experts start as lina's experts of the same global ids, and its timeline shows the
schedule the README describes (ZeRO-0: one reduction after backward; ZeRO-2: reductions from
backward hooks, then an all-gather of the updated partitions)."""

import pytest
import torch

from lina.bench.peers import PEER_NAMES, deepspeed_import_problem, resolve_peers
from lina.bench.peers.comm_spans import Phase, record_collectives
from lina.errors import ConfigError
from lina.obs.timeline import Timeline

_PROBLEM = deepspeed_import_problem()
needs_deepspeed = pytest.mark.skipif(_PROBLEM is not None, reason=f"deepspeed does not import here: {_PROBLEM}")

STEPS = 4


def _cfg(world: int):
    from lina.config import ModelConfig, TrainConfig

    model = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=32, experts=4)
    return TrainConfig(model=model, workers=world, batch_size=4, corpus_max_mb=0.5, lr=3e-3)


def _train_peers(rank: int, world: int) -> dict:
    """On each rank: lina's first step (reference loss), then each peer for STEPS steps."""
    from lina.bench.peers.deepspeed_peer import DeepSpeedPeer
    from lina.comm.groups import build_group_set
    from lina.data.corpus import load_corpus
    from lina.train.trainer import Trainer

    cfg = _cfg(world)
    corpus = load_corpus("", 0.5)
    group_set = build_group_set([world], cfg.comm.timeout_s)
    trainer = Trainer(cfg, group_set[world], corpus)
    out = {"lina_step0": trainer.train_step(0).loss}
    dense = sum(p.numel() for p in trainer.model.parameters() if not getattr(p, "lina_expert", False))
    for name in PEER_NAMES:
        # ZeRO-2 buckets of an eighth of the dense gradients: several reductions per backward
        peer = DeepSpeedPeer(name, cfg, corpus, bucket_elements=dense // 8)
        layer = peer.engine.module.moe_ffns[0].moe.deepspeed_moe.experts.deepspeed_experts
        initial = [e.fc1.weight.detach().clone() for e in layer]
        steps = [peer.train_step() for _ in range(STEPS)]
        spans = peer.timeline.spans()
        last = steps[-1]
        inside = [s for s in spans if last.start_s <= s.start_s <= last.end_s]
        backward = next(s for s in inside if s.name == "backward")
        out[name] = {
            "losses": peer.losses,
            "initial_fc1": initial,
            "cats": sorted({(s.cat, s.phase or "") for s in inside}),
            "reductions_in_backward": sum(
                1 for s in inside if s.cat == "allreduce" and backward.start_s <= s.start_s < backward.end_s
            ),
            "reductions_after_backward": sum(1 for s in inside if s.cat == "allreduce" and s.start_s >= backward.end_s),
            "gathers": sum(1 for s in inside if s.cat == "allreduce" and "all_gather" in s.name),
        }
        peer.close()
    return out


@needs_deepspeed
@pytest.mark.slow
def test_deepspeed_peer_trains_from_lina_initial_model():
    from lina.models.gpt import MoEGPT
    from lina.testing.multiproc import run_ranks

    results = run_ranks(_train_peers, 2, timeout_s=400)
    torch.manual_seed(0)
    reference = MoEGPT(_cfg(2).model, None).moe_layers()[0].experts.w1  # [E, d, d_ff], every expert
    for name in PEER_NAMES:
        for rank, res in enumerate(results):
            r = res[name]
            # same initial model, same batch: the first step's LM loss is lina's
            assert r["losses"][0] == pytest.approx(res["lina_step0"], abs=1e-4), name
            assert r["losses"][-1] < r["losses"][0], f"{name} rank {rank}: loss did not fall: {r['losses']}"
            # expert slot i of rank r is lina's global expert 2r + i (EP groups of consecutive ranks)
            for slot, w in enumerate(r["initial_fc1"]):
                torch.testing.assert_close(w, reference[2 * rank + slot].t())
            assert ("a2a", "fwd") in r["cats"] and ("a2a", "bwd") in r["cats"]
        fc1 = [w for res in results for w in res[name]["initial_fc1"]]
        assert all(not torch.equal(fc1[i], fc1[j]) for i in range(4) for j in range(i + 1, 4)), "experts start equal"
    zero0, zero2 = results[0]["deepspeed-zero0"], results[0]["deepspeed-zero2"]
    # ZeRO-0: nothing is reduced during backward; the reduction runs after it
    assert zero0["reductions_in_backward"] == 0 and zero0["reductions_after_backward"] >= 1 and zero0["gathers"] == 0
    # ZeRO-2 with overlap_comm: buckets are reduced from the backward hooks; updated partitions are gathered
    assert zero2["reductions_in_backward"] >= 2 and zero2["gathers"] >= 1


class _FakeBackend:
    """Collectives with DeepSpeed's TorchBackend signatures that do nothing."""

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        return None

    def all_to_all_single(
        self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False
    ):
        return None

    def all_gather_into_tensor(self, output_tensor, input_tensor, group=None, async_op=False):
        return None


def test_record_collectives_categories_and_bytes():
    backend, tl, phase = _FakeBackend(), Timeline(0), Phase("fwd")
    record_collectives(backend, tl, phase, lambda group: 4)
    record_collectives(backend, tl, phase, lambda group: 4)  # a second peer re-points, never wraps twice
    backend.all_to_all_single(output=torch.zeros(8, 2), input=torch.zeros(8, 2), group=None)
    phase.name = "bwd"
    backend.all_reduce(torch.zeros(100), None, None, False)
    backend.all_reduce(torch.zeros(1), None, None, False)
    phase.name = "step"
    backend.all_gather_into_tensor(torch.zeros(40), torch.zeros(10))
    spans = tl.spans()
    assert [(s.cat, s.phase) for s in spans] == [
        ("a2a", "fwd"),
        ("allreduce", "bwd"),
        ("sched", "bwd"),
        ("allreduce", None),
    ]  # the optimizer step: no pass
    assert [s.kind for s in spans[:2]] == ["alltoall", "allreduce"]
    assert spans[0].bytes == 8 * 2 * 4 * 3 // 4  # sent to the 3 other ranks of 4
    assert spans[1].bytes == 400


def test_resolve_peers_rejects_unknown_and_accepts_none():
    assert resolve_peers("none") == ([], None)
    with pytest.raises(ConfigError, match="unknown peer"):
        resolve_peers("deepspeed-zero3")


def test_without_deepspeed_default_runs_no_peers_and_says_why(monkeypatch):
    import lina.bench.peers as peers

    monkeypatch.setattr(peers, "deepspeed_import_problem", lambda: "ModuleNotFoundError: No module named 'deepspeed'")
    names, note = peers.resolve_peers(None)
    assert names == [] and "No module named 'deepspeed'" in note and "pip install 'lina[peers]'" in note
    with pytest.raises(ConfigError, match="pip install 'lina\\[peers\\]'"):
        peers.resolve_peers("deepspeed-zero0")


def test_peer_names_the_extra_when_deepspeed_is_missing(monkeypatch):
    import sys

    from lina.bench.peers.deepspeed_peer import import_deepspeed
    from lina.errors import LinaError

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # restored afterwards: import_deepspeed sets it
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` fail
    with pytest.raises(LinaError, match="pip install 'lina\\[peers\\]'"):
        import_deepspeed()


class _Gate(torch.nn.Module):
    """The attributes of DeepSpeed's TopKGate that the trace gate reads."""

    def __init__(self, drop_tokens: bool, capacity_factor: float = 1.0, min_capacity: int = 1):
        super().__init__()
        self.wg = torch.nn.Linear(8, 4, bias=False)
        self.k, self.capacity_factor, self.min_capacity = 2, capacity_factor, min_capacity
        self.drop_tokens, self.ep_group = drop_tokens, None


def _trace_routing():
    from lina.devicetime import TraceRouting

    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0], [0, 0]])[:, None, :]  # [T=5, L=1, k=2]; a repeated choice
    return TraceRouting(ids, 4)


def test_trace_gate_routes_by_the_trace_with_deepspeeds_capacity():
    from lina.bench.peers.trace_gate import TraceGate

    gate = TraceGate(_Gate(drop_tokens=False), _trace_routing(), layer=0)
    x = torch.randn(5, 8, requires_grad=True)
    aux, capacity, experts, ids, slots, weights, counts = gate(x, None, True)
    assert experts == 4 and counts.tolist() == [6, 2, 1, 1] and int(capacity) == 6  # dropless: the largest load
    assert ids.shape == (2, 5) and ids.dtype == torch.int32
    assert ids.t().tolist() == [[0, 1], [0, 2], [0, 1], [3, 0], [0, 0]]
    # each route its own slot of its expert, in token order (a repeated choice takes two)
    assert slots.t().tolist() == [[0, 0], [1, 0], [2, 1], [0, 3], [4, 5]]
    torch.testing.assert_close(weights.sum(0), torch.ones(5))
    (aux + weights.sum()).backward()
    assert gate.inner.wg.weight.grad is not None  # the gate's projection is still trained


def test_trace_gate_drops_past_deepspeeds_capacity():
    from lina.bench.peers.trace_gate import TraceGate

    gate = TraceGate(_Gate(drop_tokens=True, capacity_factor=1.0), _trace_routing(), layer=0)
    _, capacity, _, ids, slots, _, counts = gate(torch.randn(5, 8), None, True)
    assert int(capacity) == 3  # ceil(5 tokens / 4 experts x 1.0 x k=2)
    assert counts.tolist() == [6, 2, 1, 1]  # counts before dropping, as DeepSpeed reports them
    kept = ids.t() >= 0
    assert kept.tolist() == [[True, True], [True, True], [True, True], [True, False], [False, False]]
    assert int(slots.t()[kept].max()) < 3


def _device_time_peer(rank: int, world: int, trace: str) -> dict:
    """The ZeRO-0 peer for two steps in device time (a100 x 2000): its all-to-alls and compute."""
    from lina.bench.peers.deepspeed_peer import DeepSpeedPeer
    from lina.config import EmulationConfig
    from lina.data.corpus import load_corpus
    from lina.devicetime import TraceRouting

    base = _cfg(world)
    emulation = EmulationConfig(compute="a100", dilation=2000.0, routing_trace=trace)
    cfg = type(base)(model=base.model, workers=world, batch_size=4, corpus_max_mb=0.5, emulation=emulation)
    tokens = cfg.batch_size * cfg.model.seq_len
    first = TraceRouting.from_file(trace, cfg.model.experts, offset=rank * tokens).choices(0, tokens, cfg.model.top_k)
    peer = DeepSpeedPeer("deepspeed-zero0", cfg, load_corpus("", 0.5))
    steps = [peer.train_step() for _ in range(2)]
    spans = peer.timeline.spans()
    a2a = [s for s in spans if s.cat == "a2a" and s.phase == "fwd" and steps[0].start_s <= s.start_s <= steps[0].end_s]
    out = {
        "counts": torch.bincount(first.reshape(-1), minlength=cfg.model.experts).tolist(),
        "first_a2a_bytes": a2a[0].bytes,
        "losses": peer.losses,
        "device_s": peer.device_mode.device_s,
        "step_s": [s.end_s - s.start_s for s in steps],
    }
    peer.close()
    return out


@needs_deepspeed
@pytest.mark.slow
def test_deepspeed_peer_in_device_time_moves_the_traces_capacity(tmp_path):
    from lina.data.routing_trace import synthetic_trace
    from lina.testing.multiproc import run_ranks

    trace = str(tmp_path / "trace.npz")
    synthetic_trace(2000, 2, 4, top_k=2, skew=1.3, seed=3).save(trace)
    results = run_ranks(_device_time_peer, 2, trace, timeout_s=400)
    capacity = max(max(r["counts"]) for r in results)  # dropless: the largest expert load of the EP group
    d_model, experts, world = 32, 4, 2
    for r in results:
        # E x capacity rows of d_model fp32 values; the half bound for the other rank leaves
        assert r["first_a2a_bytes"] == experts * capacity * d_model * 4 * (world - 1) // world
        assert all(loss != loss for loss in r["losses"])  # device time computes no loss: NaN
        # compute took the device's time x the dilation (two steps), not the CPU's
        assert r["device_s"] > 0 and sum(r["step_s"]) >= 0.97 * r["device_s"] * 2000.0

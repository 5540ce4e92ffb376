"""Device-time compute: ops take the described device's roofline time x K (sleeping, not
computing), tensors keep their shapes, collectives move the bytes a real step moves, and more
ranks on this machine do not slow any rank's compute."""

import statistics
import time

import pytest
import torch

from lina.comm.groups import build_groups
from lina.config import CommConfig, EmulationConfig, ModelConfig, TrainConfig
from lina.data.corpus import load_corpus
from lina.data.routing_trace import synthetic_trace
from lina.devices import DeviceSpec, device_from
from lina.devicetime import DeviceTimeMode, TraceRouting, op_cost
from lina.errors import ConfigError
from lina.testing.multiproc import run_ranks
from lina.train.trainer import Trainer

DEVICE = DeviceSpec("test-gpu", peak_tflops=100.0, mem_bw_gbs=1000.0, efficiency=0.5, mem_efficiency=0.5)


def test_op_costs_by_hand():
    a, b = torch.empty(64, 32, device="meta"), torch.empty(32, 16, device="meta")
    out = torch.empty(64, 16, device="meta")
    flops, nbytes = op_cost("mm", (a, b), {}, out, float_bytes=2)
    assert flops == 2 * 64 * 32 * 16 and nbytes == 2 * (64 * 32 + 32 * 16 + 64 * 16)
    x, y = torch.empty(3, 8, 4, device="meta"), torch.empty(3, 4, 5, device="meta")
    assert op_cost("bmm", (x, y), {}, torch.empty(3, 8, 5, device="meta"))[0] == 2 * 3 * 8 * 4 * 5
    q = torch.empty(2, 4, 10, 8, device="meta")
    assert op_cost("_scaled_dot_product_flash_attention_for_cpu", (q, q, q), {}, q)[0] == 4 * 2 * 4 * 10 * 10 * 8
    g = torch.empty(100, 100, device="meta")
    assert op_cost("gelu", (g,), {}, g) == (0.0, 2 * 2 * 100 * 100)


def test_matmuls_take_the_device_time_times_dilation_and_sleep():
    a, w = torch.randn(512, 256), torch.randn(256, 1024)
    mode = DeviceTimeMode(DEVICE, dilation=50000)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with mode:
        for _ in range(4):
            y = torch.relu(a @ w)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    expected = mode.device_s * mode.dilation
    assert y.shape == (512, 1024) and mode.ops == 8
    mm = 2 * 512 * 256 * 1024 / DEVICE.flops
    assert mode.device_s >= 4 * mm
    assert abs(wall - expected) <= 0.03 * expected, (wall, expected)
    assert cpu < 0.25 * wall  # slept, not spun


def test_in_place_ops_return_their_argument_and_bookkeeping_is_real():
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with DeviceTimeMode(DEVICE, dilation=1.0):
        x = torch.randn(32, 64)
        model(x).sum().backward()
        opt.step()
        buf = torch.empty(1000)
        assert buf.add_(1.0) is buf
    state = opt.state[model.weight]
    assert float(state["step"]) == 1.0  # step counters are tiny ops: computed
    assert state["exp_avg"].shape == model.weight.shape


def test_trace_routing_takes_consecutive_tokens_per_layer_and_checks_experts():
    ids = torch.arange(10).repeat_interleave(2).view(10, 1, 2) % 4  # [T=10, L=1, k=2]
    src = TraceRouting(ids, num_experts=4, offset=3)
    first = src.choices(0, 4, 2)
    assert torch.equal(first, ids[3:7, 0])
    assert torch.equal(src.choices(0, 5, 2), ids[[7, 8, 9, 0, 1], 0])  # wraps around
    with pytest.raises(ConfigError, match="expert"):
        TraceRouting(ids, num_experts=3)
    folded = TraceRouting(ids, num_experts=2)  # 4 experts onto 2: e -> e mod 2
    assert torch.equal(folded.choices(0, 10, 2), ids[:, 0] % 2)


def test_config_needs_a_trace_and_a_device_for_dilation(tmp_path):
    with pytest.raises(ConfigError, match="routing_trace"):
        TrainConfig(emulation=EmulationConfig(compute="a100")).validate()
    with pytest.raises(ConfigError, match="dilation"):
        TrainConfig(emulation=EmulationConfig(dilation=10)).validate()
    with pytest.raises(ConfigError, match="compute"):
        device_from("no-such-gpu")
    spec = EmulationConfig(emulate="hosts=2,link=100gbit", compute="a100", dilation=100).spec()
    assert spec.link_bps == 10**9  # the real cluster's link, divided by the dilation


def _trace_file(tmp: str) -> str:
    path = f"{tmp}/routing.npz"
    synthetic_trace(2000, 2, 4, top_k=2, skew=1.3, seed=3).save(path)
    return path


def _cfg(**over) -> TrainConfig:
    base = dict(
        model=ModelConfig(d_model=64, n_layers=2, n_heads=2, d_ff=256, seq_len=32, experts=4, top_k=2),
        batch_size=8,
        comm=CommConfig(chunk_mb="1"),
        corpus_max_mb=0.3,
        policy="ddp-overlap",
    )
    return TrainConfig(**{**base, **over})


def _a2a_bytes(rank, world, trace, device_time):
    """Per all-to-all span: (name, phase, bytes) of two steps, real or device time, same routing."""
    torch.set_num_threads(1)
    cfg = _cfg(
        workers=world,
        emulation=EmulationConfig(
            compute="a100" if device_time else "real", dilation=50.0 if device_time else 1.0, routing_trace=trace
        ),
    )
    trainer = Trainer(cfg, build_groups(world, 60.0), load_corpus("", 0.3))
    if not device_time:  # the same routing source a device-time trainer installs
        source = TraceRouting.from_file(trace, 4, offset=rank * cfg.batch_size * cfg.model.seq_len)
        for layer in trainer.model.moe_layers():
            layer.routing_source = source
    for step in range(2):
        trainer.train_step(step)
    trainer.policy.close()
    return [(s.name, s.phase, s.bytes) for s in trainer.timeline.spans() if s.cat == "a2a"]


@pytest.mark.slow
def test_collectives_move_the_same_bytes_as_a_real_step(tmp_path):
    trace = _trace_file(str(tmp_path))
    real = run_ranks(_a2a_bytes, 2, trace, False, timeout_s=120)
    emulated = run_ranks(_a2a_bytes, 2, trace, True, timeout_s=120)
    assert real == emulated and len(real[0]) > 0


def _forward_spans(rank, world, trace, steps):
    """Per step: this rank's forward span and the device time the mode charged for it, x K."""
    torch.set_num_threads(1)
    cfg = _cfg(
        workers=world,
        ep_size=1,
        # K large enough that 8 ranks' dispatch on 2 cores stays well inside each op's device time
        emulation=EmulationConfig(compute="a100", dilation=200000.0, routing_trace=trace),
        batch_size=16,
    )
    trainer = Trainer(cfg, build_groups(1, 60.0), load_corpus("", 0.3))
    out = []
    for step in range(steps):
        trainer.train_step(step)
        fwd = [s for s in trainer.timeline.spans() if s.name == "forward" and s.args.get("step") == step][0]
        out.append(fwd.dur_s)
    trainer.policy.close()
    return out


@pytest.mark.slow
def test_more_ranks_do_not_slow_any_ranks_compute(tmp_path):
    trace = _trace_file(str(tmp_path))
    two = run_ranks(_forward_spans, 2, trace, 3, timeout_s=300)
    eight = run_ranks(_forward_spans, 8, trace, 3, timeout_s=300)
    base = statistics.median(two[0][1:])
    for rank, spans in enumerate(eight):
        assert statistics.median(spans[1:]) <= 1.1 * base, (rank, spans, base)


def test_a_host_slower_than_the_device_is_measured():
    a = torch.randn(64, 64)
    fast = DeviceTimeMode(DEVICE, dilation=1.0)  # tiny ops at K=1: the host's dispatch sets the pace
    with fast:
        for _ in range(200):
            a = torch.tanh(a)
    assert fast.host_bound_share() > 0.5
    slow = DeviceTimeMode(DEVICE, dilation=2e6)
    with slow:
        for _ in range(20):
            a = torch.tanh(a)
    assert slow.host_bound_share() < 0.05

"""Training-step simulation: policies behave as their names say, and it is fast at scale."""

from __future__ import annotations

import time

import pytest

from lina.errors import ConfigError
from lina.obs.chrome_trace import to_chrome_trace
from lina.sim import scenarios
from lina.sim.compute import ComputeProfile
from lina.sim.spec import ClusterSpec, CpuHostModel, DeviceSpec, ModelSpec, TrainSpec, resolve_ep
from lina.sim.train import simulate_policies, simulate_step

PROFILE = ComputeProfile(
    dense_fwd_s_per_token=2e-6,
    dense_bwd_s_per_token=4e-6,
    expert_fwd_s_per_token=1e-6,
    expert_bwd_s_per_token=2e-6,
    optimizer_s_per_param=1e-10,
)


def contended():
    """Few tokens, wide dense layers: gradients comparable to the all-to-alls (contention matters)."""
    cluster = ClusterSpec(hosts=4, gpus_per_host=1, link_gbps=10.0)
    model = ModelSpec(
        "wide",
        layers=8,
        d_model=1024,
        d_ff=2048,
        experts=4,
        top_k=2,
        seq_len=256,
        batch_size=8,
        vocab=1000,
        act_bytes=4,
    )
    return cluster, model


def test_specs_validate_with_field_names():
    with pytest.raises(ConfigError) as err:
        ClusterSpec(hosts=0, gpus_per_host=4, link_gbps=100)
    assert err.value.field == "hosts"
    with pytest.raises(ConfigError) as err:
        ClusterSpec(hosts=2, gpus_per_host=4, link_gbps=100, nics_per_host=3)
    assert err.value.field == "nics_per_host"
    with pytest.raises(ConfigError) as err:
        ModelSpec("m", layers=2, d_model=8, d_ff=8, experts=2, top_k=3, seq_len=4, batch_size=1)
    assert err.value.field == "top_k"
    with pytest.raises(ConfigError) as err:
        TrainSpec(a2a_algorithm="magic")
    assert err.value.field == "a2a_algorithm"
    with pytest.raises(ConfigError) as err:
        DeviceSpec("d", peak_tflops=1, mem_bw_gbs=1, efficiency=2)
    assert err.value.field == "efficiency"
    cluster = ClusterSpec(hosts=4, gpus_per_host=4, link_gbps=100)
    model = ModelSpec("m", layers=2, d_model=8, d_ff=8, experts=16, top_k=2, seq_len=4, batch_size=1)
    with pytest.raises(ConfigError) as err:
        resolve_ep(cluster, model, TrainSpec(ep_size=3))
    assert err.value.field == "ep_size"
    assert resolve_ep(cluster, model, TrainSpec()) == 16


def test_policies_order_and_lower_bound():
    cluster, model = contended()
    # 1 MB micro-ops: short enough that one in flight when an all-to-all starts barely matters
    res = simulate_policies(
        cluster,
        model,
        PROFILE,
        TrainSpec(chunk_mb=1.0),
        ["ddp-overlap", "sequential", "lina", "lina-priority", "lower-bound"],
    )
    lb = res["lower-bound"].step_s
    # the lower bound is that of the synchronous schedule (lina's pipelining may beat it)
    for name in ("ddp-overlap", "sequential", "lina-priority"):
        assert res[name].step_s >= lb * (1 - 1e-9)
    assert res["lower-bound"].allreduce_s == 0
    # the allreduce slows deepspeed's backward all-to-alls; the lower bound's run alone
    assert res["ddp-overlap"].bwd_a2a_s > 1.2 * res["lower-bound"].bwd_a2a_s
    # Lina keeps backward all-to-alls (nearly) alone and wins over deepspeed
    assert res["lina"].bwd_a2a_s < 1.1 * res["lower-bound"].bwd_a2a_s
    assert res["lina"].speedup > 1.05
    assert res["ddp-overlap"].speedup == pytest.approx(1.0)
    # sequential pays for the allreduce after backward: exposed communication grows
    assert res["sequential"].exposed_comm_s > res["ddp-overlap"].exposed_comm_s - 1e-12
    assert 0 < res["ddp-overlap"].a2a_share < 1


def test_sequential_allreduces_only_after_backward():
    cluster, model = contended()
    r = simulate_step(cluster, model, PROFILE, TrainSpec(), "sequential")
    last_bwd = max(t.end_s for t in r.tasks if t.cat == "compute" and t.args.get("phase") == "bwd")
    ars = [t for t in r.tasks if t.cat == "allreduce"]
    assert ars and min(t.start_s for t in ars) >= last_bwd - 1e-12


def test_lina_never_starts_an_allreduce_during_an_all_to_all():
    cluster, model = contended()
    r = simulate_step(cluster, model, PROFILE, TrainSpec(chunk_mb=1.0), "lina")
    a2a = [(t.start_s, t.end_s) for t in r.tasks if t.cat == "a2a"]
    starts = [t.start_s for t in r.tasks if t.cat == "allreduce"]
    assert len(starts) > 20  # gradients really were partitioned into micro-ops
    for s in starts:
        assert not any(a < s < b for a, b in a2a)
    # micro-ops never mix tensors and never exceed the chunk
    for t in r.tasks:
        if t.cat == "allreduce":
            assert t.args["bytes"] <= 1e6 + 1e-6 and "tensor" in t.args


def test_deepspeed_buckets_respect_the_cap():
    cluster, model = contended()
    r = simulate_step(cluster, model, PROFILE, TrainSpec(bucket_mb=5.0), "ddp-overlap")
    sizes = [t.args["bytes"] for t in r.tasks if t.cat == "allreduce"]
    tensors = [n for i in range(model.layers) for _, n in model.dense_tensors(i)] + [
        n for _, n in model.embedding_tensors()
    ]
    assert sum(sizes) == pytest.approx(sum(tensors) * model.grad_bytes)
    # a bucket closes once it reaches the cap: it exceeds it by less than one tensor
    assert all(s < 5e6 + max(tensors) * model.grad_bytes for s in sizes)
    assert sum(1 for s in sizes if s >= 5e6) >= len(sizes) - 2


def test_packing_doubles_while_ffn_is_shorter_than_a2a():
    cluster = ClusterSpec(hosts=4, gpus_per_host=2, link_gbps=5.0, nvlink_gbps=2400)
    model = ModelSpec(
        "pack", layers=4, d_model=512, d_ff=1024, experts=8, top_k=2, seq_len=512, batch_size=8, vocab=1000, act_bytes=4
    )
    r = simulate_step(cluster, model, PROFILE, TrainSpec(), "lina+packing")
    assert r.pack >= 2 and r.ep == 8 // r.pack
    first = r.pack_trace[0]
    assert first["ffn_micro_s"] < first["a2a_micro_s"]
    assert "stop" in r.pack_trace[-1]
    # packed experts are replicated: their gradients join the allreduce
    assert any(t.args.get("group") == "expert" for t in r.tasks if t.cat == "allreduce")
    plain = simulate_step(cluster, model, PROFILE, TrainSpec(), "lina")
    assert r.a2a_s < plain.a2a_s
    # max_pack caps it
    capped = simulate_step(cluster, model, PROFILE, TrainSpec(max_pack=1), "lina+packing")
    assert capped.pack == 1 and capped.pack_trace[-1]["stop"] == "max_pack"


def test_representative_and_full_steps_agree():
    cluster = ClusterSpec(hosts=2, gpus_per_host=2, link_gbps=10.0)
    model = ModelSpec(
        "tiny", layers=2, d_model=256, d_ff=512, experts=4, top_k=2, seq_len=128, batch_size=4, vocab=500, act_bytes=4
    )
    for policy in ("ddp-overlap", "lina"):
        rep = simulate_step(cluster, model, PROFILE, TrainSpec(chunk_mb=0.5), policy, representative=True)
        full = simulate_step(cluster, model, PROFILE, TrainSpec(chunk_mb=0.5), policy, representative=False)
        assert rep.step_s == pytest.approx(full.step_s, rel=1e-9)


def test_timeline_export_has_the_trainer_spans():
    cluster, model = contended()
    r = simulate_step(cluster, model, PROFILE, TrainSpec(), "ddp-overlap")
    spans = r.timeline(rank=3, offset_s=10.0).spans()
    names = {s.name for s in spans}
    assert {"step", "forward", "backward", "optimizer"} <= names
    assert all(s.rank == 3 and s.start_s >= 10.0 for s in spans)
    a2a = [s for s in spans if s.cat == "a2a"]
    assert a2a and all(s.bytes is not None and s.phase in ("fwd", "bwd") for s in a2a)
    assert {s.kind for s in a2a} == {"dispatch", "combine"}
    trace = to_chrome_trace(spans)
    assert len([e for e in trace["traceEvents"] if e["ph"] == "X"]) == len(spans)


def test_device_roofline_profile():
    model = ModelSpec("m", layers=2, d_model=1024, d_ff=4096, experts=8, top_k=2, seq_len=1024, batch_size=1)
    dev = DeviceSpec("d", peak_tflops=100.0, mem_bw_gbs=1000.0, efficiency=0.5, mem_efficiency=1.0)
    p = ComputeProfile.from_device(dev, model)
    assert p.expert_fwd_s_per_token == pytest.approx(4 * 1024 * 4096 / 50e12)
    assert p.expert_bwd_s_per_token == pytest.approx(2 * p.expert_fwd_s_per_token)
    assert p.expert_min_s == pytest.approx(2 * 1024 * 4096 * 2 / 1e12)
    assert p.expert_time(1) == pytest.approx(p.expert_min_s)  # one token: weight reads dominate
    assert p.expert_time(0) == 0.0


def test_large_scenario_simulates_fast():
    sc = scenarios.get("scale-1024-64l")
    model = sc.model.__class__(**{**sc.model.__dict__, "layers": 16})
    started = time.perf_counter()
    r = simulate_step(sc.cluster, model, sc.compute_profile(), sc.train, "lina")
    wall = time.perf_counter() - started
    assert sc.gpus == 1024
    assert r.step_s > 0 and r.events > 100
    assert wall < 8.0, f"1024-GPU 16-layer lina step took {wall:.1f} s to simulate"


def test_pure_data_parallelism_issues_no_all_to_all():
    """Every expert on every GPU (EP size 1): the MoE layers run their experts locally and only
    the gradients travel, replicated experts' included."""
    cluster = ClusterSpec(hosts=2, gpus_per_host=1, link_gbps=10.0)
    model = ModelSpec("m", layers=2, d_model=64, d_ff=128, experts=2, top_k=2, seq_len=16, batch_size=2, vocab=100)
    profile = ComputeProfile(1e-6, 2e-6, 1e-6, 2e-6)
    res = simulate_step(cluster, model, profile, TrainSpec(ep_size=1), "lina")
    assert res.a2a_s == 0.0 and not [t for t in res.tasks if t.cat == "a2a"]
    assert res.ep == 1 and res.allreduce_s > 0
    expert_grads = [t for t in res.tasks if t.cat == "allreduce" and "expert" in str(t.args.get("tensor", ""))]
    assert expert_grads  # both experts are replicated on both GPUs


def test_micro_ops_in_flight_together_and_the_next_layer_waits_for_all():
    """A backend that runs two all-to-alls of a rank at once (Gloo's two threads) starts both
    dispatch micro-ops together, the earlier served first; the next layer starts only after
    every combine micro-op, whichever ends last. With one in flight (a GPU stream) they queue."""
    model = ModelSpec("m", layers=2, d_model=64, d_ff=128, experts=2, top_k=2, seq_len=64, batch_size=8, vocab=100)
    train = TrainSpec(lina_a2a_chunks=2)
    for in_flight in (1, 2):
        cluster = ClusterSpec(hosts=2, gpus_per_host=1, link_gbps=0.1, host=CpuHostModel(a2a_in_flight=in_flight))
        res = simulate_step(cluster, model, PROFILE, train, "lina")
        by_name = {t.name: t for t in res.tasks}
        d0, d1 = by_name["fwd.dispatch.L0.c0"], by_name["fwd.dispatch.L0.c1"]
        if in_flight == 1:
            assert d1.start_s == pytest.approx(d0.end_s)
        else:
            assert d1.start_s == pytest.approx(d0.start_s) and d0.end_s < d1.end_s
        combines = [by_name[f"fwd.combine.L0.c{j}"] for j in range(2)]
        assert by_name["fwd.dense.L1"].start_s >= max(t.end_s for t in combines) - 1e-12
    with pytest.raises(ConfigError, match="a2a_in_flight"):
        CpuHostModel(a2a_in_flight=0)

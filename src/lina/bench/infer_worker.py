"""What each worker of ``lina bench infer`` runs: trace replay through the inference engine, the
placement policies interleaved batch by batch (A B C D A B C D ...), after warm-up.
``python -m lina.bench.infer_worker PLAN.json`` (started by torchrun on each emulated host)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lina.bench.plan import InferBenchPlan
from lina.cluster.teardown import leave_distributed
from lina.data.routing_trace import RoutingTrace
from lina.devices import device_from
from lina.devicetime import DeviceTimeMode
from lina.infer.engine import InferenceEngine, LayerRouting
from lina.infer.policies import make_serving_policy
from lina.infer.store import ExpertStore
from lina.placement.estimators import load_estimator
from lina.train.worker import device_time_summary, init_distributed


def batch_tokens(num_tokens: int, world: int, per_rank: int, batch: int, seed: int) -> np.ndarray:
    """Token indices [world, per_rank] of one batch: a fixed random permutation of the trace's
    tokens, cycled (every rank computes the same table, so the oracle knows the global counts)."""
    perm = np.random.default_rng(seed).permutation(num_tokens)
    start = batch * world * per_rank
    return perm[(start + np.arange(world * per_rank)) % num_tokens].reshape(world, per_rank)


def device_mode(plan: InferBenchPlan) -> DeviceTimeMode | None:
    """The device-time mode the expert FFNs run under (None: they compute)."""
    if plan.compute == "real":
        return None
    return DeviceTimeMode(device_from(plan.compute), plan.dilation)


@contextlib.contextmanager
def _expert_block(mode: DeviceTimeMode):
    """One layer's expert FFNs under ``mode``; what ran since the last block (collectives,
    scheduling) is not counted as the host falling behind the device."""
    mode.expect_idle()
    with mode:
        yield


def run(plan: InferBenchPlan) -> None:
    init_distributed(600.0, plan.world)
    try:
        _run(plan)
    finally:
        leave_distributed()


def _run(plan: InferBenchPlan) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    trace = RoutingTrace.load(plan.trace)
    layers = min(plan.layers, trace.num_layers)
    experts = trace.expert_tensor()[:, :layers]  # [T, L, k]
    probs = (
        torch.from_numpy(trace.gate_probs[:, :layers]).float()
        if trace.gate_probs is not None
        else torch.full(experts.shape, 1.0 / trace.top_k)
    )
    estimator = load_estimator(plan.estimator)
    store = ExpertStore.random(layers, trace.num_experts, plan.d_model, plan.d_ff, seed=plan.seed)
    d, k, e = plan.d_model, trace.top_k, trace.num_experts
    gen = torch.Generator().manual_seed(plan.seed + rank)
    mode = device_mode(plan)
    engines = {
        name: InferenceEngine(
            store,
            k,
            dist.group.WORLD,
            make_serving_policy(
                name, e, world, k, layers, estimator=estimator, eplb_replan_every=plan.eplb_replan_every
            ),
            compute_mode=None if mode is None else (lambda: _expert_block(mode)),
        )
        for name in plan.policies
    }
    rows: dict[str, list[dict]] = {name: [] for name in plan.policies}
    total = plan.warmup + plan.batches
    for b in range(total):
        table = batch_tokens(trace.num_tokens, world, plan.tokens_per_rank, b, plan.seed)
        mine = torch.from_numpy(table[rank]).long()
        everyone = torch.from_numpy(table.reshape(-1)).long()
        free_counts = torch.stack(
            [torch.bincount(experts[everyone, layer].reshape(-1), minlength=e).double() for layer in range(layers)]
        )
        ids, weights = experts[mine], probs[mine]
        gate = lambda layer, h: LayerRouting(ids[:, layer], weights[:, layer])  # noqa: E731
        dense = lambda layer, h: (h, h)  # noqa: E731
        h0 = torch.randn(len(mine), d, generator=gen)
        for name, engine in engines.items():
            dist.barrier()
            with torch.no_grad():
                _, stats = engine.run_batch(h0, dense, gate, free_counts)
            if b >= plan.warmup:
                rows[name].append(
                    {
                        "latency_s": stats.latency_s,
                        "layer_a2a_s": stats.layer_a2a_s,
                        "phase1_s": stats.phase1_s,
                        "phase2_s": stats.phase2_s,
                        "device_rows": stats.max_device_rows,
                    }
                )
        if rank == 0 and (b + 1) % max(1, total // 5) == 0:
            print(f"  batch {b + 1}/{total}", flush=True)
    # The busiest device sets each layer's time: gather every rank's received rows.
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        out = {
            name: {
                "batches": rows[name],
                "device_rows_by_rank": [g[name] and [r["device_rows"] for r in g[name]] for g in gathered],
            }
            for name in plan.policies
        }
        out["lina_policy_stats"] = engines["lina"].policy.stats if "lina" in engines else None
        out["device_time"] = None if mode is None else device_time_summary(mode, "lina bench infer")
        Path(plan.result).write_text(json.dumps(out))
    for engine in engines.values():
        engine.store.close()


if __name__ == "__main__":
    from lina.cluster.failures import run_recorded

    run_recorded(run, InferBenchPlan.load(sys.argv[1]))

"""What each worker of ``lina bench serve`` runs: requests replayed from a routing trace through the
inference engine, prefill and decode steps, the placement policies interleaved step by step
(A B C D A B C D ...), after warm-up rounds. ``python -m lina.bench.serve_worker PLAN.json``
(started by torchrun on each emulated host) or :func:`run` (local processes).

A request is a window of ``prompt_len + decode_steps`` consecutive tokens of one trace sequence:
its prefill is the first ``prompt_len`` tokens at once, decode step t its token ``prompt_len + t``,
so decode routes as the traced sequence did, token after token. Every rank draws the same table of
windows, so the oracle knows each step's global counts. Only the MoE layers run (attention and
the rest of the model are not modelled); expert compute is real, or charged a device's time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lina.cluster.teardown import leave_distributed
from lina.data.routing_trace import RoutingTrace
from lina.infer.engine import InferenceEngine
from lina.infer.policies import make_serving_policy
from lina.infer.step_replay import device_time_expert, replay_step
from lina.infer.store import ExpertStore
from lina.placement.estimators import load_estimator
from lina.train.worker import init_distributed


def sequence_rows(trace: RoutingTrace, min_len: int) -> list[np.ndarray]:
    """Trace row indices of every sequence with at least ``min_len`` tokens, in token order."""
    out = []
    for seq in np.unique(trace.seq_id):
        rows = np.flatnonzero(trace.seq_id == seq)
        rows = rows[np.argsort(trace.token_idx[rows], kind="stable")]
        if len(rows) >= min_len:
            out.append(rows)
    return out


def request_table(seqs: list[np.ndarray], world: int, per_rank: int, length: int, seed: int) -> np.ndarray:
    """Trace rows of each rank's requests: int64[world, per_rank, length], random windows of
    ``length`` consecutive tokens of random sequences (the same table on every rank)."""
    g = np.random.default_rng(seed)
    table = np.zeros((world, per_rank, length), dtype=np.int64)
    for r in range(world):
        for q in range(per_rank):
            rows = seqs[int(g.integers(len(seqs)))]
            start = int(g.integers(len(rows) - length + 1))
            table[r, q] = rows[start : start + length]
    return table


def run(plan: dict) -> None:
    init_distributed(600.0, plan["world"])
    try:
        _run(plan)
    finally:
        leave_distributed()


def _run(plan: dict) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    trace = RoutingTrace.load(plan["trace"])
    layers = min(plan["layers"], trace.num_layers)
    experts = trace.expert_tensor()[:, :layers]  # [T, L, k]
    probs = (
        torch.from_numpy(trace.gate_probs[:, :layers]).float()
        if trace.gate_probs is not None
        else torch.full(experts.shape, 1.0 / trace.top_k)
    )
    estimator = load_estimator(plan["estimator"])
    decode_estimator = load_estimator(plan["decode_estimator"])  # lina-window-predict's
    store = ExpertStore.random(layers, trace.num_experts, plan["d_model"], plan["d_ff"], seed=plan["seed"])
    d, k, e = plan["d_model"], trace.top_k, trace.num_experts
    prompt, steps = plan["prompt_len"], plan["decode_steps"]
    seqs = sequence_rows(trace, prompt + steps)
    timed = device_time_expert(plan["compute"], plan["dilation"])
    engines = {
        name: InferenceEngine(
            store,
            k,
            dist.group.WORLD,
            make_serving_policy(
                name,
                e,
                world,
                k,
                layers,
                estimator=decode_estimator if name == "lina-window-predict" else estimator,
                eplb_replan_every=4,
            ),
            **({"expert_fn": timed} if timed is not None else {}),
        )
        for name in plan["policies"]
    }
    rows: dict[str, dict[str, list[float]]] = {name: {"prefill_s": [], "decode_s": []} for name in plan["policies"]}
    gen = torch.Generator().manual_seed(plan["seed"] + rank)
    total = plan["warmup"] + plan["rounds"]
    for round_ in range(total):
        table = request_table(seqs, world, plan["requests_per_rank"], prompt + steps, plan["seed"] + round_)
        phases = [("prefill_s", slice(0, prompt))] + [
            ("decode_s", slice(prompt + t, prompt + t + 1)) for t in range(steps)
        ]
        for phase, span in phases:
            mine = torch.from_numpy(table[rank, :, span].reshape(-1))
            everyone = torch.from_numpy(table[:, :, span].reshape(-1))
            free_counts = torch.stack(
                [torch.bincount(experts[everyone, j].reshape(-1), minlength=e).double() for j in range(layers)]
            )
            ids, weights = experts[mine], probs[mine]
            h0 = torch.randn(len(mine), d, generator=gen)
            for name, engine in engines.items():
                stats = replay_step(engine, ids, weights, h0, free_counts)
                if round_ >= plan["warmup"]:
                    rows[name][phase].append(stats.latency_s)
        if rank == 0:
            print(f"  round {round_ + 1}/{total}", flush=True)
    # a step ends when its slowest rank is done: keep every step's maximum over ranks
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        out = {
            name: {
                phase: np.max([g[name][phase] for g in gathered], axis=0).tolist()
                for phase in ("prefill_s", "decode_s")
            }
            for name in plan["policies"]
        }
        out["sources"] = {name: engine.policy.source_report(layers) for name, engine in engines.items()}
        out["arms"] = {
            name: engine.policy.arm_report()
            for name, engine in engines.items()
            if engine.policy.arm_report() is not None
        }
        Path(plan["result"]).write_text(json.dumps(out))
    for engine in engines.values():
        engine.store.close()


if __name__ == "__main__":
    from lina.cluster.failures import run_recorded

    run_recorded(run, json.loads(Path(sys.argv[1]).read_text()))

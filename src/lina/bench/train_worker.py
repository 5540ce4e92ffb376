"""What each worker of ``lina bench train`` runs: for every expert count, one model trained with
the policies interleaved (A B C D A B C D ...) after warm-up; per-step measurements from the one
timeline. ``python -m lina.bench.train_worker PLAN.json`` (started by torchrun on each host).

A policy that packs experts (``lina+packing``, :attr:`lina.policy.TrainPolicy.packing`): during its
warm-up the packing controller (the one ``--packing auto`` uses) measures a few steps at each packing
and doubles experts per rank while an FFN micro-op is shorter than an all-to-all micro-op; its
measured steps then run at the packing it chose, the other policies at one layout without packing
(the model moves between layouts when the policy changes; the move and the settling steps after it, see
:func:`round_schedule`, are outside the measured steps).

Peers (``plan.peers``, :mod:`lina.bench.peers`: real DeepSpeed-MoE engines) train their own
copy of the model in the same processes: after lina's warm-up they warm up, and in every round they
run after lina's policies, ``steps_per_round`` measured steps each (A B C D E P1 P2 A B ...)."""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lina.bench.peers import start_peers
from lina.bench.plan import TrainBenchPlan
from lina.cluster.teardown import leave_distributed
from lina.comm.groups import build_group_set
from lina.config import CommConfig, EmulationConfig, ModelConfig, TrainConfig
from lina.data.corpus import load_corpus
from lina.obs.report import step_breakdown
from lina.obs.schema import RunSetup, fields_of, run_summary
from lina.obs.timeline import Span, Timeline
from lina.policy import BASELINE_POLICY, train_policy
from lina.train.packing import PackingController, packing_ep_sizes, parse_packing
from lina.train.trainer import Trainer
from lina.train.worker import init_distributed


def step_metrics(spans: list[Span], step: Span) -> dict[str, float]:
    """The benchmark's measurements of one step of one rank: :func:`lina.obs.report.step_breakdown`
    under the benchmark's JSON names."""
    b = step_breakdown(spans, step)
    return {
        "compute_busy_in_a2a_s": b["compute_busy_in_a2a"],
        "step_time_s": b["step"],
        "a2a_s": b["a2a_total"],
        "bwd_a2a_s": b["a2a_bwd"],
        "fwd_a2a_s": b["a2a_fwd"],
        "allreduce_s": b["allreduce_in_flight"],
        "sync_wait_s": b["allreduce_exposed"],
        "partition_s": b["partition"],
        "expert_compute_s": b["expert_compute"],
        "a2a_bytes": b["a2a_bytes"],
    }


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def run(plan: TrainBenchPlan) -> None:
    init_distributed(plan.timeout_s, plan.world)
    try:
        _run(plan)
    finally:
        leave_distributed()


def _run(plan: TrainBenchPlan) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(plan.out)
    timeout_s = plan.timeout_s
    packing = any(train_policy(p).packing for p in plan.policies)
    group_set = build_group_set(packing_ep_sizes(parse_packing("auto" if packing else "off"), 0, world), timeout_s)
    corpus = load_corpus("", 1.0)
    results = []
    for experts in plan.experts:
        model = ModelConfig(**{**plan.model, "experts": experts})
        # built with a policy that never packs (the benchmark runs the packing search itself, below);
        # one that partitions gradients when any benchmarked policy does, so chunk_mb 'auto' is swept
        partitioned = any(train_policy(p).partitions_gradients for p in plan.policies)
        cfg = TrainConfig(
            model=model,
            workers=world,
            batch_size=plan.batch_size,
            policy="lina" if partitioned else BASELINE_POLICY,
            comm=CommConfig(
                chunk_mb=plan.chunk_mb,
                pipeline_chunks=plan.pipeline_chunks,
                credit=plan.credit,
                timeout_s=timeout_s,
            ),
            seed=plan.seed,
            emulation=EmulationConfig(
                compute=plan.compute,
                dilation=plan.dilation,
                routing_trace=plan.routing_trace,
            ),
        )
        cfg.validate()
        timeline = Timeline(rank)
        trainer = Trainer(cfg, group_set[world], corpus, timeline, group_set=group_set)
        if plan.buckets:  # DDP buckets scaled to the model: the same bucket count as a big model
            dense = sum(
                p.numel() * p.element_size() for p in trainer.model.parameters() if not getattr(p, "lina_expert", False)
            )
            trainer.cfg.comm.bucket_mb = dense / plan.buckets / 2**20
            trainer.set_policy(trainer.policy.name)
        dense_bytes = sum(
            p.numel() * p.element_size() for p in trainer.model.parameters() if not getattr(p, "lina_expert", False)
        )
        peers = start_peers(list(plan.peers), cfg, corpus, timeline, _peer_bucket_elements(plan, dense_bytes))
        lina_losses = _track_losses(trainer)
        layout = {
            p: world for p in list(plan.policies) + [peer.name for peer in peers]
        }  # EP size each policy runs with
        search: dict = {}
        step = 0
        measured: dict[str, list[Span]] = {p: [] for p in layout}
        for policy in plan.policies:  # warm-up, not measured
            _select(trainer, policy, layout[policy])
            for _ in range(plan.warmup):
                trainer.train_step(step)
                step += 1
            if train_policy(policy).packing:
                layout[policy], search, step = _search_packing(trainer, step, plan.packing_window)
                if rank == 0:
                    print(
                        f"  experts {experts}: {policy} chose {experts // layout[policy]} experts per rank "
                        f"({len(search['decisions'])} decisions)",
                        flush=True,
                    )
        for peer in peers:  # warm-up, not measured
            for _ in range(plan.warmup):
                peer.train_step()
        settled = {p: 0 for p in layout}
        # the packing search of the warm-up may have just moved the experts (and back)
        moved = any(d.get("new_experts_per_rank") != d.get("experts_per_rank") for d in search.get("decisions", []))
        for r in range(plan.rounds):
            for policy, steps in round_schedule(
                plan.policies,
                layout,
                trainer.groups.ep_size,
                plan.steps_per_round,
                plan.settle,
                moved=moved and r == 0,
            ):
                _select(trainer, policy, layout[policy])
                for is_measured in steps:
                    trainer.train_step(step)
                    if is_measured:
                        measured[policy].append(next(s for s in reversed(timeline.spans()) if s.cat == "step"))
                    else:
                        settled[policy] += 1
                    step += 1
            for peer in peers:  # after lina's policies, each peer for as many measured steps
                for _ in range(plan.steps_per_round):
                    measured[peer.name].append(peer.train_step())
            if rank == 0:
                print(f"  experts {experts}: round {r + 1}/{plan.rounds} done", flush=True)
        trainer.policy.close()
        for peer in peers:
            peer.close()
        spans = timeline.spans()
        per_policy = {p: [step_metrics(spans, st) for st in steps] for p, steps in measured.items()}
        entry = {
            "experts": experts,
            "chunk_mb": trainer.chunk_mb,
            "device_time": (
                {
                    "device": trainer.device_mode.device.name,
                    "dilation": trainer.device_mode.dilation,
                    "host_bound_share": trainer.device_mode.host_bound_share(),
                }
                if trainer.device_mode is not None
                else None
            ),
            "chunk_sweep_s": getattr(getattr(trainer, "chunk_sweep", None), "seconds", None),
            "dense_grad_bytes": dense_bytes,
            "policies": {
                p: {k: _median(rows, k) for k in rows[0]}
                | {
                    "step_time_s_min": min(r["step_time_s"] for r in rows),
                    "step_time_s_max": max(r["step_time_s"] for r in rows),
                    "steps": len(rows),
                    "experts_per_rank": experts // layout[p],
                    "settle_steps": settled[p],
                    "compute_busy_in_a2a": _busy_share(rows),
                }
                for p, rows in per_policy.items()
            },
            "packing": search,
        }
        if peers:
            entry["peers"] = [peer.name for peer in peers]
            if trainer.device_mode is None:  # device time computes no loss
                entry["loss_after_steps"] = _losses_at_equal_steps(lina_losses, peers)
        results.append(entry)
        _save_runs(out, plan, cfg, experts, measured, spans, entry, rank, world)
        del trainer
    if rank == 0:
        (out / f"results-{plan.layout}.json").write_text(json.dumps(results, indent=2))


def round_schedule(
    policies: list[str], layout: dict[str, int], ep_size: int, steps_per_round: int, settle: int, moved: bool = False
) -> list[tuple[str, list[bool]]]:
    """One interleaving round: for each policy in turn, its steps (True: measured, False: an
    unmeasured settling step).

    A policy whose layout (EP size, ``layout[policy]``) differs from the one the model is in when
    its turn comes first runs ``settle`` unmeasured steps: after the experts move, the first steps
    run up to 20% faster than the steady state on the emulated cluster (measured with
    ``lina train --packing 4@5``: 4-6 fast steps after the move, on loopback as well), which would
    flatter a packed policy measured right after its move. Switches that keep the layout measure at
    once. ``ep_size``: the layout the model is in before the round; ``moved``: the experts have just
    moved into it (the warm-up's packing search), so the first policy settles whatever its layout.
    """
    out = []
    for policy in policies:
        moved = moved or layout[policy] != ep_size
        ep_size = layout[policy]
        out.append((policy, [False] * (settle if moved else 0) + [True] * steps_per_round))
        moved = False
    return out


def _select(trainer: Trainer, policy: str, ep_size: int) -> None:
    """Run the next steps with ``policy``'s gradient sync at EP size ``ep_size``."""
    trainer.set_policy(policy)
    trainer.repack(ep_size)


def _search_packing(trainer: Trainer, step: int, window: int) -> tuple[int, dict, int]:
    """Lina's packing controller on the running policy: ``window`` steps at each packing, then a
    decision (collective); stops when it keeps the packing or undoes a doubling that made steps
    slower. Returns (EP size, what it measured and
    decided, next step)."""
    world = trainer.groups.world_size
    controller = PackingController(
        parse_packing("auto"), trainer.cfg.model.experts, trainer.groups.ep_size, first_step=step + window, every=window
    )
    while True:
        for _ in range(window):
            trainer.train_step(step)
            step += 1
        layer_bytes = trainer.model.moe_layers()[0].experts.training_bytes()
        target = controller.target_ep(step, trainer.groups.ep_size, trainer.timeline, layer_bytes)
        if target == trainer.groups.ep_size:
            break
        trainer.repack(target)
        if controller.settled:  # a doubling was undone
            break
    ep = trainer.groups.ep_size
    return (
        ep,
        {
            "experts_per_rank": trainer.cfg.model.experts // ep,
            "ep_size": ep,
            "world": world,
            "window_steps": window,
            "decisions": controller.history,
        },
        step,
    )


def _peer_bucket_elements(plan: TrainBenchPlan, dense_bytes: int) -> int:
    """Gradient bucket size, in fp32 elements, for peers that take one: the bucket count of lina's
    bucketed policies (``buckets``), or their 25 MB buckets when ``buckets`` is 0."""
    bucket_bytes = dense_bytes / plan.buckets if plan.buckets else 25 * 2**20
    return max(1, int(bucket_bytes // 4))


def _track_losses(trainer: Trainer) -> dict[int, float]:
    """Every lina step's LM loss on this rank, by step index (the comparison with the peers at
    equal steps: lina's step k and a peer's step k train on the same batch)."""
    losses: dict[int, float] = {}
    inner = trainer.train_step

    def train_step(step: int):
        result = inner(step)
        losses[step] = result.loss
        return result

    trainer.train_step = train_step
    return losses


def _losses_at_equal_steps(lina_losses: dict[int, float], peers: list) -> dict:
    """LM loss after N steps, N = the steps every peer ran (warm-up included), mean over ranks:
    lina's model at its step N - 1 (whichever policy ran it; all of lina's policies compute the
    same numbers) and each peer's at its step N - 1, the same batch (collective)."""
    n = min(peer.steps_done for peer in peers)
    values = torch.tensor([lina_losses[n - 1]] + [peer.losses[n - 1] for peer in peers], dtype=torch.float64)
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return {"steps": n, "lina": float(values[0])} | {
        peer.name: float(v) for peer, v in zip(peers, values[1:], strict=True)
    }


def _busy_share(rows: list[dict]) -> float | None:
    """Share of all-to-all time during which an expert FFN ran on the same rank (paper Table 3)."""
    a2a = sum(r["a2a_s"] for r in rows)
    return sum(r["compute_busy_in_a2a_s"] for r in rows) / a2a if a2a > 0 else None


def _save_runs(
    out: Path,
    plan: TrainBenchPlan,
    cfg: TrainConfig,
    experts: int,
    measured: dict,
    spans: list[Span],
    entry: dict,
    rank: int,
    world: int,
) -> None:
    """Per (expert count, policy): the spans of its measured steps and a summary, in the run-folder
    format the simulator calibrates from (``lina sim --calibrate``). A peer's folder holds its
    spans only: the simulator models lina's policies, not DeepSpeed's padded all-to-all, so
    calibration (which takes every folder with a ``summary.json``) leaves peers out."""
    for policy, steps in measured.items():
        folder = out / "runs" / f"{plan.layout}-e{experts}-{policy}"
        folder.mkdir(parents=True, exist_ok=True)
        windows = [(s.start_s, s.end_s) for s in steps]
        keep = [s for s in spans if any(a - 1e-6 <= s.start_s <= b for a, b in windows)]
        tl = Timeline(rank)
        for s in keep:
            tl.record(s.name, s.cat, s.start_s, s.end_s, thread=s.thread, **fields_of(s), **s.args)
        tl.save_jsonl(folder / f"timeline-rank{rank}.jsonl")
        if rank == 0 and policy not in entry.get("peers", []):
            m = cfg.model
            setup = RunSetup(
                layers=m.n_layers,
                d_model=m.d_model,
                d_ff=m.d_ff,
                experts=experts,
                top_k=m.top_k,
                seq_len=m.seq_len,
                batch_size=cfg.batch_size,
                workers=world,
                policy=policy,
                chunk_mb=float(entry["chunk_mb"]),
                vocab=m.vocab_size,
                moe_every=m.moe_interval,
                hosts=plan.hosts,
                workers_per_host=plan.workers_per_host,
                link_bps=float(plan.link_bps) / plan.dilation,  # the emulated link the measured times ran on
                bucket_mb=float(cfg.comm.bucket_mb),
                pipeline_chunks=cfg.comm.pipeline_chunks,
                ep_size=experts // entry["policies"][policy]["experts_per_rank"],
                backend=dist.get_backend(),
                cpu_count=os.cpu_count(),
            )
            config = {
                "layers": m.n_layers,
                "d_model": m.d_model,
                "d_ff": m.d_ff,
                "experts": experts,
                "top_k": m.top_k,
                "seq_len": m.seq_len,
                "batch_size": cfg.batch_size,
                "vocab_size": m.vocab_size,
                "workers": world,
                "hosts": plan.hosts,
                "workers_per_host": plan.workers_per_host,
                "link_bps": plan.link_bps,
                "policy": policy,
                "chunk_mb": entry["chunk_mb"],
                "pipeline_chunks": cfg.comm.pipeline_chunks,
                "bucket_mb": cfg.comm.bucket_mb,
                "experts_per_rank": entry["policies"][policy]["experts_per_rank"],
                "dense_grad_bytes": entry["dense_grad_bytes"],
                "cpu_count": os.cpu_count(),
                "backend": dist.get_backend(),
            }
            summary = run_summary(setup, config, entry["policies"][policy]["step_time_s"])
            if entry["device_time"] is not None:  # lina sim --calibrate predicts these with no CPU host model
                summary["device_time"] = entry["device_time"]
            (folder / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    run(TrainBenchPlan.load(sys.argv[1]))

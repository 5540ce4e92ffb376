"""What each worker of ``lina bench train`` runs: for every expert count, one model trained with
the policies interleaved (A B C D A B C D ...) after warm-up; per-step measurements from the one
timeline. ``python -m lina.bench.train_worker PLAN.json`` (started by torchrun on each host)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch.distributed as dist

from lina.comm.groups import build_groups
from lina.config import ModelConfig, TrainConfig
from lina.data.corpus import load_corpus
from lina.obs.timeline import Span, Timeline, union_length
from lina.train.trainer import Trainer
from lina.train.worker import init_distributed


def step_metrics(spans: list[Span], step: Span) -> dict[str, float]:
    """Measurements of one step of one rank, all read off its timeline."""
    inside = [s for s in spans if s.start_s >= step.start_s - 1e-6 and s.start_s <= step.end_s]

    def union(pred) -> float:
        return union_length([(s.start_s, min(s.end_s, step.end_s)) for s in inside if pred(s)])

    a2a_bytes = sum(s.args.get("bytes", 0) for s in inside if s.cat == "a2a")
    return {
        "step_time_s": step.dur_s,
        "a2a_s": union(lambda s: s.cat == "a2a"),
        "bwd_a2a_s": union(lambda s: s.cat == "a2a" and s.args.get("phase") == "bwd"),
        "fwd_a2a_s": union(lambda s: s.cat == "a2a" and s.args.get("phase") == "fwd"),
        "allreduce_s": union(lambda s: s.cat == "allreduce"),
        "sync_wait_s": union(lambda s: s.name == "gradsync.finish"),
        "partition_s": sum(s.dur_s for s in inside if s.name == "partition"),
        "expert_compute_s": union(lambda s: s.cat == "compute" and ".experts" in s.name),
        "a2a_bytes": a2a_bytes,
    }


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def run(plan: dict) -> None:
    init_distributed(plan.get("timeout_s", 300.0))
    try:
        _run(plan)
    finally:
        dist.destroy_process_group()


def _run(plan: dict) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(plan["out"])
    groups = build_groups(world, plan.get("timeout_s", 300.0))
    corpus = load_corpus("", 1.0)
    results = []
    for experts in plan["experts"]:
        model = ModelConfig(**{**plan["model"], "experts": experts})
        cfg = TrainConfig(model=model, workers=world, batch_size=plan["batch_size"], schedule=plan["policies"][-1],
                          chunk_mb=str(plan["chunk_mb"]), pipeline_chunks=plan["pipeline_chunks"], seed=plan["seed"],
                          timeout_s=plan.get("timeout_s", 300.0))
        cfg.validate()
        timeline = Timeline(rank)
        trainer = Trainer(cfg, groups, corpus, timeline)
        step = 0
        measured: dict[str, list[Span]] = {p: [] for p in plan["policies"]}
        for policy in plan["policies"]:  # warm-up, not measured
            trainer.set_policy(policy)
            for _ in range(plan["warmup"]):
                trainer.train_step(step)
                step += 1
        for r in range(plan["rounds"]):
            for policy in plan["policies"]:
                trainer.set_policy(policy)
                for _ in range(plan["steps_per_round"]):
                    trainer.train_step(step)
                    measured[policy].append(next(s for s in reversed(timeline.spans()) if s.cat == "step"))
                    step += 1
            if rank == 0:
                print(f"  experts {experts}: round {r + 1}/{plan['rounds']} done", flush=True)
        trainer.policy.close()
        spans = timeline.spans()
        per_policy = {p: [step_metrics(spans, st) for st in steps] for p, steps in measured.items()}
        dense_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if not getattr(p, "lina_expert", False))
        entry = {
            "experts": experts,
            "chunk_mb": trainer.chunk_mb,
            "chunk_sweep_s": getattr(getattr(trainer, "chunk_sweep", None), "seconds", None),
            "dense_grad_bytes": dense_bytes,
            "policies": {p: {k: _median(rows, k) for k in rows[0]} | {"step_time_s_min": min(r["step_time_s"] for r in rows),
                                                                        "step_time_s_max": max(r["step_time_s"] for r in rows),
                                                                        "steps": len(rows)}
                         for p, rows in per_policy.items()},
        }
        results.append(entry)
        _save_runs(out, plan, cfg, experts, measured, spans, entry, rank, world)
        del trainer
    if rank == 0:
        (out / f"results-{plan['layout']}.json").write_text(json.dumps(results, indent=2))


def _save_runs(out: Path, plan: dict, cfg: TrainConfig, experts: int, measured: dict, spans: list[Span], entry: dict, rank: int, world: int) -> None:
    """Per (expert count, policy): the spans of its measured steps and a summary, in the run-folder
    format the simulator calibrates from (``lina sim --calibrate``)."""
    for policy, steps in measured.items():
        folder = out / "runs" / f"{plan['layout']}-e{experts}-{policy}"
        folder.mkdir(parents=True, exist_ok=True)
        windows = [(s.start_s, s.end_s) for s in steps]
        keep = [s for s in spans if any(a - 1e-6 <= s.start_s <= b for a, b in windows)]
        tl = Timeline(rank)
        for s in keep:
            tl.record(s.name, s.cat, s.start_s, s.end_s, thread=s.thread, **s.args)
        tl.save_jsonl(folder / f"timeline-rank{rank}.jsonl")
        if rank == 0:
            m = cfg.model
            summary = {
                "config": {
                    "layers": m.n_layers, "d_model": m.d_model, "d_ff": m.d_ff, "experts": experts, "top_k": m.top_k,
                    "seq_len": m.seq_len, "batch_size": cfg.batch_size, "vocab_size": m.vocab_size, "workers": world,
                    "hosts": plan["hosts"], "workers_per_host": plan["workers_per_host"], "link_bps": plan["link_bps"],
                    "policy": policy, "chunk_mb": entry["chunk_mb"], "pipeline_chunks": cfg.pipeline_chunks,
                    "dense_grad_bytes": entry["dense_grad_bytes"],
                },
                "step_time_s_median": entry["policies"][policy]["step_time_s"],
            }
            (folder / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))

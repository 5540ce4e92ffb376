"""What every training process runs, under ``lina train``'s launcher or under ``torchrun``.

Reads RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT set by the launcher, joins
the process group (Gloo on CPU, NCCL when CUDA is present), trains, evaluates, checkpoints, and on
rank 0 writes ``metrics.jsonl`` and ``summary.json`` under the output folder.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lina.comm.groups import build_group_set
from lina.config import TrainConfig
from lina.data.corpus import load_corpus
from lina.obs.timeline import Timeline
from lina.train import checkpoint
from lina.train.packing import PackingController
from lina.train.trainer import Trainer


def init_distributed(timeout_s: float, workers_on_machine: int | None = None) -> None:
    """Join the process group (Gloo on CPU, NCCL with CUDA) and share the CPU cores fairly.

    Args:
        workers_on_machine: worker processes sharing this machine's cores; on the emulated
            cluster every host is on one machine, so pass the world size; default: the local
            world size torchrun reports.
    """
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    local = workers_on_machine or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()


def _truncate_metrics(path: Path, first_step: int) -> None:
    """On resume, drop rows of steps that will be run again (nothing is counted twice)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] < first_step]
    path.write_text("".join(r + "\n" for r in rows))


def run(cfg_dict: dict) -> dict | None:
    """Train with the given config (a ``TrainConfig.to_dict()``); returns the summary on rank 0."""
    cfg = TrainConfig.from_dict(cfg_dict)
    init_distributed(cfg.timeout_s, cfg.workers if cfg.emulate_spec() is not None else None)
    try:
        return _train(cfg)
    finally:
        dist.destroy_process_group()


def _train(cfg: TrainConfig) -> dict | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != cfg.workers:
        cfg.workers = world  # under torchrun the launcher decides the worker count
        cfg.validate()
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    # Every layout the run may use is created now (new_group is collective), including the one a
    # resumed checkpoint was written in.
    state = checkpoint.load_rank(ckpt_root, rank) if cfg.resume else None
    controller = PackingController.from_config(cfg, world)
    ep_sizes = controller.ep_sizes() + ([checkpoint.packing_ep_size(state, controller.initial_ep())] if state else [])
    group_set = build_group_set(ep_sizes, cfg.timeout_s)
    corpus = load_corpus(cfg.corpus, cfg.corpus_max_mb)
    if cfg.model.hf_model:  # the checkpoint's own tokenizer, when its folder has one
        from lina.hf.tokens import corpus_for

        corpus = corpus_for(cfg.model.hf_model, corpus, cfg.model.vocab_size)
    # The trace streams to its file as the run goes (a long run's spans are not held in memory).
    trace_path = Path(cfg.trace) / f"timeline-rank{rank}.jsonl" if cfg.trace else None
    timeline = Timeline(rank, enabled=True, spill_path=trace_path)
    trainer = Trainer(cfg, group_set[controller.initial_ep()], corpus, timeline, group_set=group_set, bounded_timeline=True)
    start_step = 0
    if state is not None:
        start_step = trainer.load_state_dict(state)
        del state
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        if cfg.resume:
            _truncate_metrics(metrics_path, start_step)
        else:
            metrics_path.unlink(missing_ok=True)
        print(f"lina train: {world} workers, EP size {trainer.groups.ep_size} ({trainer.experts_per_rank} experts per rank, "
              f"packing {cfg.packing}), {cfg.model.experts} experts top-{cfg.model.top_k}, "
              f"schedule {cfg.schedule}; {corpus.describe()}; steps {start_step}..{cfg.steps - 1}", flush=True)
        if cfg.max_expert_memory_mb > 0:
            _print_memory(trainer.expert_memory())
    results = []
    val_loss = None
    wall_start = time.perf_counter()
    for step in range(start_step, cfg.steps):
        decisions = len(trainer.packing.history)
        res = trainer.train_step(step)
        loss = trainer.mean_over_ranks(res.loss)
        results.append(res)
        if rank == 0:
            for d in trainer.packing.history[decisions:]:
                if d["reason"].startswith("settled"):
                    continue
                print(f"packing before step {d['step']}: {d['experts_per_rank']} -> {d['new_experts_per_rank']} experts per rank ({d['reason']})", flush=True)
                if d["new_experts_per_rank"] != d["experts_per_rank"] and cfg.max_expert_memory_mb > 0:
                    _print_memory(trainer.expert_memory())
            _append_metrics(metrics_path, {
                "step": step, "loss": loss, "step_time_s": res.step_time_s, "a2a_time_s": res.a2a_time_s,
                "allreduce_time_s": res.allreduce_time_s, "sync_wait_s": res.sync_wait_s, "schedule": cfg.schedule,
                "experts_per_rank": res.experts_per_rank,
            })
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                print(f"step {step:5d}/{cfg.steps}  loss {loss:.4f}  step {res.step_time_s * 1e3:7.1f} ms  "
                      f"a2a {res.a2a_time_s * 1e3:6.1f} ms  allreduce {res.allreduce_time_s * 1e3:6.1f} ms", flush=True)
        last = step == cfg.steps - 1
        if (step + 1) % cfg.eval_every == 0 or last:
            val_loss = trainer.evaluate()
            if rank == 0:
                print(f"step {step:5d}  validation loss {val_loss:.4f}", flush=True)
        if (step + 1) % cfg.checkpoint_every == 0 or last:
            checkpoint.save_rank(ckpt_root, step, rank, trainer.state_dict(step))
            dist.barrier()
            if rank == 0:
                checkpoint.mark_latest(ckpt_root, step, world)
    wall = time.perf_counter() - wall_start
    hf_out = None
    if cfg.model.hf_model:  # the fine-tuned checkpoint, experts gathered (a collective)
        from lina.hf.checkpoint import save_pretrained

        hf_out = save_pretrained(trainer.model.handle, out / "hf-model", tokenizer_from=cfg.model.hf_model)
    trainer.policy.close()
    timeline.flush()  # the rest of the trace, when there is one
    if rank != 0:
        return None
    summary = summarize(cfg, results, val_loss, wall)
    summary["packing"] = {"mode": cfg.packing, "experts_per_rank": trainer.experts_per_rank, "ep_size": trainer.groups.ep_size,
                          "decisions": trainer.packing.history}
    summary["expert_memory"] = trainer.expert_memory()
    summary["backend"] = dist.get_backend()  # how many collectives of a rank run at once (lina sim --calibrate)
    summary["chunk_mb_resolved"] = trainer.chunk_mb  # what chunk_mb "auto" chose (lina sim --calibrate reads it)
    if hf_out is not None:
        summary["hf_model_out"] = str(hf_out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.trace:
        (Path(cfg.trace) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _print_memory(mem: dict) -> None:
    print(f"expert memory (budget {mem['budget_mb']:g} MB): {mem['resident_layers']} MoE layer(s) resident ({mem['resident_mb']:.2f} MB), "
          f"{mem['offloaded_layers']} offloaded to host ({mem['offloaded_experts']} experts, {mem['offloaded_mb']:.2f} MB); "
          f"brought in {mem['copies_in']} times so far ({mem['mb_in']:.1f} MB)", flush=True)


def summarize(cfg: TrainConfig, results: list, val_loss: float | None, wall_s: float) -> dict:
    n = len(results)
    steps_time = sum(r.step_time_s for r in results)
    a2a = sum(r.a2a_time_s for r in results)
    wait = sum(r.sync_wait_s for r in results)
    tokens = n * cfg.batch_size * cfg.model.seq_len * cfg.workers
    return {
        "config": cfg.to_dict(),
        "steps_run": n,
        "final_loss": statistics.mean(r.loss for r in results[-10:]) if results else None,
        "val_loss": val_loss,
        "tokens_per_s": tokens / steps_time if steps_time else None,
        "wall_s": wall_s,
        "step_time_s_median": statistics.median(r.step_time_s for r in results) if results else None,
        "time_split_s": {
            "compute": steps_time - a2a - wait,
            "all_to_all": a2a,
            "allreduce_exposed": wait,
            "allreduce_in_flight": sum(r.allreduce_time_s for r in results),
        },
        "a2a_share": a2a / steps_time if steps_time else None,
    }


if __name__ == "__main__":
    # ``python -m lina.train.worker CONFIG.json``: how launchers of other hosts start a worker.
    run(json.loads(Path(sys.argv[1]).read_text()))

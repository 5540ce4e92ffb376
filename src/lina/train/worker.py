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

from lina.cluster.teardown import leave_distributed
from lina.comm.collective_check import CollectiveLog
from lina.comm.groups import build_group_set
from lina.config import TrainConfig
from lina.data.corpus import load_corpus
from lina.devicetime.mode import HOST_BOUND_LIMIT
from lina.obs.schema import RunSetup, run_summary
from lina.obs.timeline import Timeline
from lina.train import checkpoint
from lina.train.packing import PackingController
from lina.train.resume import check_model, group_for_checkpoints, load_trainer, resume_layout, save_trainer
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
    init_distributed(cfg.comm.timeout_s, cfg.workers if cfg.emulate_spec() is not None else None)
    try:
        with CollectiveLog() as collectives:  # a failing collective names its group and op
            return _train(cfg, collectives)
    finally:
        leave_distributed()


def _watch(collectives: CollectiveLog, group_set: dict) -> None:
    """Name every process group of every layout for the collective log (and check them all)."""
    collectives.watch(None, "world")
    for ep, groups in sorted(group_set.items(), reverse=True):
        collectives.watch(groups.dp_group, "dp")
        if groups.ep_group is not None:
            collectives.watch(groups.ep_group, f"ep{ep}")
        if groups.expert_dp_group is not None:
            collectives.watch(groups.expert_dp_group, f"expert-dp{ep}")


def _train(cfg: TrainConfig, collectives: CollectiveLog) -> dict | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != cfg.workers:
        cfg.workers = world  # under torchrun the launcher decides the worker count
        cfg.validate()
    out = Path(cfg.output.out)
    ckpt_root = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    # Every layout the run may use is created now (new_group is collective), including the one a
    # resumed run starts in.
    resume = checkpoint.resume_point(ckpt_root) if cfg.output.resume else None
    if resume is not None:
        check_model(cfg, resume[1], resume[0])
    controller = PackingController.from_config(cfg, world)
    resume_ep = resume_layout(cfg, resume[1], world) if resume is not None else None
    ep_sizes = controller.ep_sizes() + ([resume_ep] if resume_ep is not None else [])
    group_set = build_group_set(ep_sizes, cfg.comm.timeout_s)
    ckpt_group = group_for_checkpoints(cfg.comm.timeout_s)
    _watch(collectives, group_set)
    if cfg.comm.check_collectives:
        collectives.prepare_check(cfg.comm.timeout_s)
    corpus = load_corpus(cfg.corpus, cfg.corpus_max_mb)
    if cfg.model.hf_model:  # the checkpoint's own tokenizer, when its folder has one
        from lina.hf.tokens import corpus_for

        corpus = corpus_for(cfg.model.hf_model, corpus, cfg.model.vocab_size)
    # The trace streams to its file as the run goes (a long run's spans are not held in memory).
    trace_path = Path(cfg.output.trace) / f"timeline-rank{rank}.jsonl" if cfg.output.trace else None
    timeline = Timeline(rank, enabled=True, spill_path=trace_path)
    trainer = Trainer(
        cfg, group_set[controller.initial_ep()], corpus, timeline, group_set=group_set, bounded_timeline=True
    )
    start_step = 0
    if resume is not None:
        start_step = load_trainer(resume[0], resume[1], trainer, resume_ep, ckpt_group)
        if rank == 0:
            print(
                f"resumed from {resume[0]} (written on {resume[1]['world_size']} workers, EP size "
                f"{resume[1]['ep_size']}) "
                f"on {world} workers, EP size {trainer.groups.ep_size}",
                flush=True,
            )
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        if cfg.output.resume:
            _truncate_metrics(metrics_path, start_step)
        else:
            metrics_path.unlink(missing_ok=True)
        print(
            f"lina train: {world} workers, EP size {trainer.groups.ep_size} "
            f"({trainer.experts_per_rank} experts per rank, "
            f"packing {cfg.effective_packing}), {cfg.model.experts} experts top-{cfg.model.top_k}, "
            f"policy {cfg.policy}; {corpus.describe()}; steps {start_step}..{cfg.steps - 1}",
            flush=True,
        )
        if cfg.packing.max_expert_memory_mb > 0:
            _print_memory(trainer.expert_memory())
        if cfg.emulation.device_time:
            print(
                f"device-time compute: every compute op takes {cfg.emulation.compute}'s time x "
                f"{cfg.emulation.dilation:g} instead of being "
                "computed, so no loss is computed or reported (numerics are proven in real-compute runs)",
                flush=True,
            )
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
                print(
                    f"packing before step {d['step']}: {d['experts_per_rank']} -> {d['new_experts_per_rank']} experts "
                    f"per rank ({d['reason']})",
                    flush=True,
                )
                if d["new_experts_per_rank"] != d["experts_per_rank"] and cfg.packing.max_expert_memory_mb > 0:
                    _print_memory(trainer.expert_memory())
            _append_metrics(
                metrics_path,
                {
                    "step": step,
                    "loss": loss,
                    "step_time_s": res.step_time_s,
                    "a2a_time_s": res.a2a_time_s,
                    "allreduce_time_s": res.allreduce_time_s,
                    "sync_wait_s": res.sync_wait_s,
                    "policy": cfg.policy,
                    "experts_per_rank": res.experts_per_rank,
                },
            )
            if step % cfg.output.log_every == 0 or step == cfg.steps - 1:
                shown = "-" if cfg.emulation.device_time else f"{loss:.4f}"
                print(
                    f"step {step:5d}/{cfg.steps}  loss {shown}  step {res.step_time_s * 1e3:7.1f} ms  "
                    f"a2a {res.a2a_time_s * 1e3:6.1f} ms  allreduce {res.allreduce_time_s * 1e3:6.1f} ms",
                    flush=True,
                )
        last = step == cfg.steps - 1
        if (step + 1) % cfg.eval_every == 0 or last:
            val_loss = trainer.evaluate()
            if rank == 0 and not cfg.emulation.device_time:
                print(f"step {step:5d}  validation loss {val_loss:.4f}", flush=True)
        if (step + 1) % cfg.output.checkpoint_every == 0 or last:
            save_trainer(ckpt_root, step, trainer, ckpt_group)
        if cfg.comm.check_collectives:
            collectives.check_step(step)  # raises on every rank when the ranks' sequences differ
    wall = time.perf_counter() - wall_start
    hf_out = None
    if cfg.model.hf_model:  # the fine-tuned checkpoint, experts gathered (a collective)
        from lina.hf.checkpoint import save_pretrained, source_shard_bytes

        hf_out = save_pretrained(  # sharded like the source checkpoint, when it is
            trainer.model.handle,
            out / "hf-model",
            tokenizer_from=cfg.model.hf_model,
            max_shard_bytes=source_shard_bytes(cfg.model.hf_model),
        )
    trainer.policy.close()
    timeline.flush()  # the rest of the trace, when there is one
    if rank != 0:
        return None
    measured = summarize(cfg, results, val_loss, wall)
    measured["packing"] = {
        "mode": cfg.effective_packing,
        "experts_per_rank": trainer.experts_per_rank,
        "ep_size": trainer.groups.ep_size,
        "decisions": trainer.packing.history,
    }
    measured["expert_memory"] = trainer.expert_memory()
    measured["policy"] = cfg.policy
    if trainer.device_mode is not None:
        measured["device_time"] = device_time_summary(trainer.device_mode)
    # the run schema's summary: what ran (the chunk size "auto" chose, backend, layout) and provenance
    setup = run_setup(cfg, trainer, world)
    if hf_out is not None:
        measured["hf_model_out"] = str(hf_out)
    summary = run_summary(setup, measured.pop("config"), measured.pop("step_time_s_median"), **measured)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.output.trace:
        (Path(cfg.output.trace) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_setup(cfg: TrainConfig, trainer: Trainer, world: int) -> RunSetup:
    """What this run ran, in the run schema's spelling (:class:`lina.obs.schema.RunSetup`)."""
    spec = cfg.emulate_spec()
    m = cfg.model
    return RunSetup(
        layers=m.n_layers,
        d_model=m.d_model,
        d_ff=m.d_ff,
        experts=m.experts,
        top_k=m.top_k,
        seq_len=m.seq_len,
        batch_size=cfg.batch_size,
        workers=world,
        policy=trainer.policy.name,
        chunk_mb=float(trainer.chunk_mb),
        vocab=m.vocab_size,
        moe_every=m.moe_interval,
        hosts=spec.hosts if spec else None,
        workers_per_host=spec.workers_per_host if spec else None,
        link_bps=float(spec.link_bps) if spec else None,
        bucket_mb=float(cfg.comm.bucket_mb),
        pipeline_chunks=cfg.comm.pipeline_chunks,
        ep_size=trainer.groups.ep_size,
        backend=dist.get_backend(),
        cpu_count=os.cpu_count(),
    )


def _print_memory(mem: dict) -> None:
    print(
        f"expert memory (budget {mem['budget_mb']:g} MB): {mem['resident_layers']} MoE layer(s) resident "
        f"({mem['resident_mb']:.2f} MB), "
        f"{mem['offloaded_layers']} offloaded to host ({mem['offloaded_experts']} experts, "
        f"{mem['offloaded_mb']:.2f} MB); "
        f"brought in {mem['copies_in']} times so far ({mem['mb_in']:.1f} MB)",
        flush=True,
    )


def device_time_summary(mode, command: str = "lina train") -> dict:
    """What a device-time run's device did, and whether this machine kept up with it."""
    share = mode.host_bound_share()
    out = {
        "device": mode.device.name,
        "dilation": mode.dilation,
        "device_s": mode.device_s,
        "host_bound_share": share,
        "ops_charged": mode.ops,
    }
    if share > HOST_BOUND_LIMIT:
        wanted = mode.dilation * (1 + share) / (1 - HOST_BOUND_LIMIT)
        out["warning"] = (
            f"the device idled {share:.0%} of its time waiting for this machine's dispatch: step times "
            f"describe this CPU, not the device. Fix: --dilation {wanted:.0f} or more"
        )
        print(f"{command}: warning: {out['warning']}", flush=True)
    return out


def summarize(cfg: TrainConfig, results: list, val_loss: float | None, wall_s: float) -> dict:
    n = len(results)
    steps_time = sum(r.step_time_s for r in results)
    a2a = sum(r.a2a_time_s for r in results)
    wait = sum(r.sync_wait_s for r in results)
    tokens = n * cfg.batch_size * cfg.model.seq_len * cfg.workers
    return {
        "config": cfg.to_dict(),
        "steps_run": n,
        "final_loss": statistics.mean(r.loss for r in results[-10:])
        if results and not cfg.emulation.device_time
        else None,
        "val_loss": None if cfg.emulation.device_time else val_loss,
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
    from lina.cluster.failures import run_recorded

    run_recorded(run, json.loads(Path(sys.argv[1]).read_text()))

"""Saving a trainer to a checkpoint and resuming one from it, on any layout.

What a resumed run keeps: the step (and so the data position: batches are a pure function of
seed, step and global sequence index, see :func:`lina.data.corpus.sample_sequences`), every
parameter, AdamW's state, each rank's random state (rank 0's for ranks the writer did not have)
and, when the job is unchanged, the packing controller's state and layout.

Which layout it resumes in: the checkpoint's, when the worker count is the same and no layout is
asked for (no ``--ep-size``, ``--packing`` off or ``auto``); otherwise the one the options give,
and the experts are resharded by global id as they are read.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lina.config import TrainConfig
from lina.train import checkpoint
from lina.train.checkpoint_state import apply_state, flat_state, template
from lina.train.packing import PackingController


def checkpoint_meta(trainer, step: int) -> dict[str, Any]:
    """What ``meta.json`` records besides the tensors (JSON-ready)."""
    cfg = trainer.cfg
    return {
        "world_size": trainer.groups.world_size,
        "ep_size": trainer.groups.ep_size,
        "experts_per_rank": trainer.experts_per_rank,
        "packing": {"mode": cfg.packing.mode, "controller": trainer.packing.state_dict()},
        "model": cfg.model.__dict__.copy(),
        "data": {
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "next_step": step + 1,
            "global_batch": cfg.batch_size * trainer.groups.world_size,
        },
    }


def save_trainer(ckpt_root: Path, step: int, trainer, group=None) -> Path:
    """Write ``trainer``'s state after ``step`` (a collective)."""
    tensors = flat_state(trainer.model, trainer.optimizer, trainer.groups.rank)
    return checkpoint.save(ckpt_root, step, tensors, checkpoint_meta(trainer, step), group)


def resume_layout(cfg: TrainConfig, meta: dict[str, Any], world: int) -> int:
    """The EP size a resumed run starts with (see the module docstring)."""
    controller = PackingController.from_config(cfg, world)
    saved_ep = int(meta["ep_size"])
    keeps = (
        int(meta["world_size"]) == world
        and not cfg.ep_size
        and controller.spec.mode in ("off", "auto")
        and world % saved_ep == 0
        and cfg.model.experts % saved_ep == 0
    )
    return saved_ep if keeps else controller.initial_ep()


def check_model(cfg: TrainConfig, meta: dict[str, Any], folder: Path) -> None:
    """The model settings must be those of the checkpoint (CheckpointError naming the differences)."""
    saved = meta.get("model", {})
    diffs = [f"{k} {saved[k]!r} -> {v!r}" for k, v in cfg.model.__dict__.items() if k in saved and saved[k] != v]
    if diffs:
        raise checkpoint.CheckpointError(
            folder,
            "was written for another model: " + ", ".join(diffs),
            "resume with the model settings of the run that wrote it",
        )


def load_trainer(folder: Path, meta: dict[str, Any], trainer, ep_size: int, group=None) -> int:
    """Move ``trainer`` (freshly built) to EP size ``ep_size``, fill it from the checkpoint in
    ``folder`` (a collective) and return the first step to run."""
    trainer.repack(ep_size)
    rank = trainer.groups.rank
    rng_key = f"rng/{rank if rank < int(meta['world_size']) else 0}"
    loaded = checkpoint.load(folder, template(trainer.model, True, rng_key), group)
    apply_state(trainer.model, trainer.optimizer, loaded, rng_key)
    same_job = int(meta["world_size"]) == trainer.groups.world_size and ep_size == int(meta["ep_size"])
    if same_job and meta.get("packing", {}).get("mode") == trainer.cfg.packing.mode:
        trainer.packing.load_state_dict(meta["packing"].get("controller", {}))
    trainer.place_experts()
    return int(meta["step"]) + 1


def group_for_checkpoints(timeout_s: float):
    """A Gloo group over all ranks for DCP's coordination (CPU tensors on any backend), with the
    run's collective timeout; every rank must create it at the same point."""
    return dist.new_group(list(range(dist.get_world_size())), backend="gloo", timeout=timedelta(seconds=timeout_s))

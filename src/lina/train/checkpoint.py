"""Checkpoints: one file per rank (expert parameters differ between ranks), written atomically
(temporary file, then rename), and a ``latest`` pointer written last, so a crash mid-write never
leaves a corrupt latest checkpoint. Loaded with ``weights_only=True``.

A rank's state carries the expert layout it was written in (``state["packing"]["ep_size"]``):
expert shapes depend on it, so a resumed run rebuilds that layout before loading (see
:meth:`lina.train.trainer.Trainer.load_state_dict`) and may then repack."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lina.errors import LinaError

KEEP = 2


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_rank(ckpt_root: Path, step: int, rank: int, state: dict[str, Any]) -> Path:
    """Write ``state`` of one rank for ``step``; call :func:`mark_latest` once every rank is done."""
    folder = ckpt_root / f"step-{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank-{rank}.pt"
    _atomic_write_bytes(path, lambda tmp: torch.save(state, tmp))
    return path


def mark_latest(ckpt_root: Path, step: int, world_size: int) -> None:
    """Point ``latest`` at ``step`` (after checking every rank's file exists) and prune old ones."""
    folder = ckpt_root / f"step-{step:07d}"
    missing = [r for r in range(world_size) if not (folder / f"rank-{r}.pt").exists()]
    if missing:
        raise LinaError(f"checkpoint {folder} lacks the files of ranks {missing}")
    latest = ckpt_root / "latest"
    _atomic_write_bytes(latest, lambda tmp: tmp.write_text(folder.name + "\n"))
    steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in steps[:-KEEP]:
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)


def latest_folder(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / "latest"
    if not pointer.exists():
        return None
    folder = ckpt_root / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def load_rank(ckpt_root: Path, rank: int) -> dict[str, Any]:
    folder = latest_folder(ckpt_root)
    if folder is None:
        raise LinaError(f"--resume: no checkpoint under {ckpt_root}. Fix: run without --resume first, or point --out at the earlier run's folder")
    path = folder / f"rank-{rank}.pt"
    if not path.exists():
        raise LinaError(f"--resume: {path} is missing; the checkpoint was written by a run with a different worker count. Fix: resume with the same --workers")
    return torch.load(path, weights_only=True, map_location="cpu")


def packing_ep_size(state: dict[str, Any], default: int) -> int:
    """The EP size a rank's state was written with (checkpoints from before packing: ``default``)."""
    return int(state.get("packing", {}).get("ep_size", default))

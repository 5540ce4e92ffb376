"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): layout-free, atomic, safe to load.

A checkpoint is the folder ``checkpoints/step-NNNNNNN/`` holding DCP's files (``__<rank>_0.distcp``
and ``.metadata``) and ``meta.json`` (format, step, the layout it was written in, the packing
controller's state, the size and SHA-256 of every file). The tensors are those of
:mod:`lina.train.checkpoint_state`: dense parameters once, experts by global id, AdamW state,
random state; so a run resumes on another worker count, EP size or packing layout (each rank
reads the experts its new layout gives it).

Written atomically: every rank writes into ``.step-NNNNNNN.tmp/``; rank 0 adds ``meta.json``,
renames the folder into place and only then points ``latest`` at it (a temporary file renamed
over it). A crash at any point leaves ``latest`` on the previous, complete checkpoint.

Loaded without running code from the files: ``meta.json`` is JSON; every file's size and hash
are checked first (a truncated or replaced file is named, nothing is loaded); DCP's pickled
``.metadata`` is read by an unpickler that only builds DCP's own metadata classes, and tensors
through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lina.errors import ConfigError, LinaError

FORMAT = "lina-dcp"
VERSION = 1
KEEP = 2
META = "meta.json"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from (missing, damaged, foreign, previous format)."""

    def __init__(self, folder: Path | str, problem: str, fix: str):
        super().__init__("checkpoint", f"{folder}: {problem}", fix)


_FRESH = (
    "start afresh without --resume (or with another --out), or point checkpoints/latest at an earlier step-* folder"
)


# --- where ----------------------------------------------------------------------------------


def step_folder(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step-{step:07d}"


def latest_folder(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / "latest"
    if not pointer.exists():
        return None
    folder = ckpt_root / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def resume_point(ckpt_root: Path) -> tuple[Path, dict[str, Any]]:
    """The latest checkpoint under ``ckpt_root`` and its ``meta.json``, checked: files complete and
    unchanged. Cheap enough to call before any worker starts.

    Raises:
        CheckpointError: there is none, it was written by an earlier lina (one ``torch.save``
            file per rank), or a file is missing, truncated or replaced.
    """
    folder = latest_folder(ckpt_root)
    if folder is None:
        raise CheckpointError(
            ckpt_root,
            "no checkpoint (no 'latest' pointing at a step-* folder)",
            "run without --resume first, or point --out at the earlier run's folder",
        )
    meta = read_meta(folder)
    verify_files(folder, meta)
    return folder, meta


def read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META
    if not path.exists():
        if any(folder.glob("rank-*.pt")):
            raise CheckpointError(
                folder,
                "written by an earlier lina (one torch.save file per rank, tied to its "
                "worker count); this lina resumes only from its own layout-free format",
                "finish that run with the lina version that started it, or " + _FRESH,
            )
        raise CheckpointError(folder, f"has no {META}, so it is not a complete lina checkpoint", _FRESH)
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(folder, f"{META} is not valid JSON ({err})", _FRESH) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(folder, f"{META} does not describe a {FORMAT} checkpoint", _FRESH)
    if int(meta.get("version", 0)) > VERSION:
        raise CheckpointError(
            folder,
            f"format version {meta['version']} is newer than this lina reads ({VERSION})",
            "resume with the lina version that wrote it",
        )
    return meta


def verify_files(folder: Path, meta: dict[str, Any]) -> None:
    """Every file ``meta.json`` lists has its recorded size and SHA-256 (CheckpointError otherwise)."""
    for name, want in sorted(meta.get("files", {}).items()):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(folder, f"{name} is missing", _FRESH)
        size = path.stat().st_size
        if size != want["bytes"]:
            problem = f"{name} has {size} bytes, {want['bytes']} were written (truncated or replaced)"
            raise CheckpointError(folder, problem, _FRESH)
        if _sha256(path) != want["sha256"]:
            raise CheckpointError(folder, f"{name} differs from what was written (its SHA-256 changed)", _FRESH)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- writing --------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier(group) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def save(ckpt_root: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], group=None) -> Path:
    """Write the checkpoint of ``step`` (a collective over ``group``, every rank with its own
    ``tensors``; ``meta`` is rank 0's, JSON-ready) and point ``latest`` at it; returns its folder."""
    ckpt_root = Path(ckpt_root)
    tmp = ckpt_root / f".step-{step:07d}.tmp"
    if _rank() == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(".step-*.tmp"):  # left by a crash during an earlier write
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier(group)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _single_process_quiet():
            dcp.save(
                tensors,
                storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True),
                process_group=group,
                no_dist=not dist.is_initialized(),
            )
    except CheckpointException as err:  # a BaseException: one rank's failure, reported on every rank
        raise LinaError(
            f"writing checkpoint {tmp.name} failed: {_first_line(err)}; {ckpt_root / 'latest'} still "
            "points at the previous checkpoint. Fix: check free space and permissions of the --out "
            "folder"
        ) from None
    final = step_folder(ckpt_root, step)
    if _rank() == 0:
        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir()) if p.is_file()
        }
        record = {"format": FORMAT, "version": VERSION, "step": step, **meta, "files": files}
        _write_atomic(tmp / META, json.dumps(record, indent=1))
        if final.exists():  # the same step written again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        _write_atomic(ckpt_root / "latest", final.name + "\n")
        for old in sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())[:-KEEP]:
            if old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(group)
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading --------------------------------------------------------------------------------

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata and nothing else: any other global is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name} (only DCP's metadata classes are allowed)")


def _safe_reader(folder: Path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    class SafeReader(dcp.FileSystemReader):
        """DCP's file reader with its ``.metadata`` read by :class:`_MetadataUnpickler`; only
        tensor entries are accepted (byte entries would be unpickled with arbitrary classes)."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            with open(Path(self.path) / ".metadata", "rb") as fh:
                metadata = _MetadataUnpickler(io.BytesIO(fh.read())).load()
            entries = getattr(metadata, "state_dict_metadata", None)
            if not isinstance(entries, dict) or not all(isinstance(v, TensorStorageMetadata) for v in entries.values()):
                raise pickle.UnpicklingError("the metadata lists entries that are not tensors")
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(folder))


def load(folder: Path, tensors: dict[str, torch.Tensor], group=None) -> dict[str, torch.Tensor]:
    """Fill ``tensors`` (a template: the keys this rank needs, allocated) from the checkpoint in
    ``folder`` (a collective over ``group`` when distributed); returns them.

    Raises:
        CheckpointError: a key is missing (another model shape), a file is unreadable, or the
            metadata asks for anything but tensors.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _single_process_quiet():
            dcp.load(
                tensors, storage_reader=_safe_reader(folder), process_group=group, no_dist=not dist.is_initialized()
            )
    except (CheckpointException, pickle.UnpicklingError, RuntimeError, ValueError, OSError, EOFError, KeyError) as err:
        raise CheckpointError(
            folder,
            f"cannot be loaded: {_first_line(err)}",
            "resume with the model settings of the run that wrote it, or " + _FRESH,
        ) from None
    return tensors


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it runs in one process even when asked to (export, tests); nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    if not text:
        return type(err).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    shown = [line for line in lines if "Error" in line or "Missing" in line or "refused" in line][:2] or lines[:1]
    return " ".join(s.strip() for s in shown)[:400]

"""``.npz`` files with a JSON ``meta`` entry: how traces and estimators are stored (compressed,
read with ``allow_pickle=False``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lina.errors import ConfigError, LinaError


def write_npz(path: str | Path, meta: dict, arrays: dict[str, np.ndarray], what: str) -> Path:
    """Write ``arrays`` and ``meta`` (as JSON) to ``path``, which must end in ``.npz``."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ConfigError("path", f"{path} does not end in .npz", f"save {what}s as FILE.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez_compressed(fh, meta=np.array(json.dumps(meta)), **arrays)
    return path


def read_npz(path: str | Path, what: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a file written by :func:`write_npz`: ``(meta, arrays)``; LinaError names the file."""
    path = Path(path)
    if not path.is_file():
        raise LinaError(f"{what} file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {name: data[name] for name in data.files if name != "meta"}
    except (KeyError, ValueError, OSError) as err:
        raise LinaError(f"cannot read {what} {path}: {err}") from err
    return meta, arrays

"""``.npz`` files with a JSON ``meta`` entry: how traces and estimators are stored (compressed,
read with ``allow_pickle=False``)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from lina.errors import ConfigError


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
    """Read a file written by :func:`write_npz`: ``(meta, arrays)``.

    Raises:
        ConfigError: the file is missing, is not a ``.npz`` archive, holds pickled Python objects
            (never loaded: ``allow_pickle=False``) or lacks its ``meta`` entry; names the file and
            what to pass instead.
    """
    path = Path(path)
    fix = f"pass a {what} written by lina (.npz)"
    if not path.is_file():
        raise ConfigError(what, f"file {path} not found", f"check the path; {fix}")
    if not zipfile.is_zipfile(path):
        raise ConfigError(what, f"{path} is not a .npz archive", fix)
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {name: data[name] for name in data.files if name != "meta"}
    except KeyError:
        raise ConfigError(what, f"{path} has no 'meta' entry, so lina did not write it", fix) from None
    except ValueError as err:
        pickled = "pickle" in str(err)
        problem = "holds pickled Python objects, which lina never loads" if pickled else f"is unreadable ({err})"
        raise ConfigError(what, f"{path} {problem}", fix) from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise ConfigError(what, f"{path} is damaged ({type(err).__name__}: {err})", fix) from None
    return meta, arrays

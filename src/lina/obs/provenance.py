"""Where a result came from: versions, command line, checkout commit, machine, time.

Every JSON result lina writes carries :func:`provenance` under the key ``"provenance"`` so a
figure can be traced back to the code and machine that produced it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lina


def git_commit(start: str | Path | None = None) -> str | None:
    """The commit of the checkout that holds the ``lina`` package (with ``+dirty`` when it has
    uncommitted changes), or None when lina does not run from a git checkout."""
    folder = Path(start) if start is not None else Path(lina.__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """A JSON-ready record of what produced a result.

    Args:
        argv: the command line to record; defaults to ``sys.argv``.

    Returns:
        ``{"lina", "torch", "python", "command", "git_commit", "cores", "host", "time_utc"}``.
    """
    import torch

    return {
        "lina": lina.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": list(sys.argv if argv is None else argv),
        "git_commit": git_commit(),
        "cores": os.cpu_count(),
        "host": platform.node(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

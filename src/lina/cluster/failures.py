"""What a failed worker said: read from torch elastic's error file, turned into one clear error.

Every worker runs under :func:`torch.distributed.elastic.multiprocessing.errors.record` (the
local launcher wraps it; ``python -m lina.train.worker`` decorates its entry point), which writes
the exception to the file named by ``TORCHELASTIC_ERROR_FILE``: ``{"message": {"message":
"ConfigError: invalid ...", "extraInfo": {"py_callstack": "...", "timestamp": "..."}}}`` (older
writers put a plain string under ``"message"``). The launchers read those files instead of parsing
printed output, pick the failure that started it all and raise :class:`WorkerFailed`, whose
message is the worker's own error line with its rank and host, and whose exit code is that of the
worker's :class:`~lina.errors.LinaError` class when the worker raised one on purpose (2 for a
:class:`~lina.errors.ConfigError`), else 1.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lina.errors import LinaError

# Errors of a worker that only lost a peer which failed first (Gloo, NCCL, c10d store).
LOST_PEER = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker crashing",
    "Broken pipe",
    "ECONNRESET",
    "Socket Timeout",
    "failed to recv",
    "Connection refused",
)


@dataclass
class WorkerFailure:
    """One worker that ended badly.

    Attributes:
        rank: global rank.
        host: the host it ran on (a name, or ``h<i>`` on the emulated cluster).
        exitcode: its exit code (negative: killed by that signal).
        message: its own error line, e.g. ``"ConfigError: invalid workers: ..."`` ("" when it
            left no error file, e.g. killed by a signal).
        traceback: the Python call stack it recorded ("" when none).
        timestamp: when it failed (seconds since the epoch; 0 when unknown).
    """

    rank: int
    host: str
    exitcode: int
    message: str = ""
    traceback: str = ""
    timestamp: int = 0

    @property
    def error_type(self) -> str:
        head, sep, _ = self.message.partition(": ")
        return head if sep and head.isidentifier() else ""

    @property
    def text(self) -> str:
        """The message without the exception class when it is one of lina's own errors (they are
        written for the user); other exceptions keep their class name."""
        cls = lina_error_class(self.error_type)
        return self.message.partition(": ")[2] if cls is not None else self.message

    @property
    def lost_peer(self) -> bool:
        return any(marker in self.message for marker in LOST_PEER)

    @property
    def how(self) -> str:
        return f"exit code {self.exitcode}" if self.exitcode >= 0 else f"signal {-self.exitcode}"


def read_error_file(path: str | Path) -> tuple[str, str, int]:
    """``(message, traceback, timestamp)`` from an elastic error file; ``("", "", 0)`` when it is
    missing or unreadable (a worker killed by a signal writes none)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return "", "", 0
    return parse_error_data(data)


def parse_error_data(data: Any) -> tuple[str, str, int]:
    """Both layouts of an elastic error file's content -> ``(message, traceback, timestamp)``."""
    if not isinstance(data, dict):
        return "", "", 0
    message = data.get("message", "")
    if message in ("<NONE>", "<N/A>"):  # elastic's placeholders for "no error file"
        return "", "", 0
    if isinstance(message, dict):
        extra = message.get("extraInfo", {}) if isinstance(message.get("extraInfo"), dict) else {}
        return str(message.get("message", "")), str(extra.get("py_callstack", "")), _int(extra.get("timestamp"))
    return str(message), "", _int(data.get("timestamp"))


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def lina_error_class(name: str) -> type[LinaError] | None:
    """The :class:`LinaError` subclass called ``name`` (imported anywhere in lina), or None."""
    todo: list[type[LinaError]] = [LinaError]
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def root_cause(failures: list[WorkerFailure]) -> WorkerFailure:
    """The failure most likely to have started it: a worker that raised an error that is not a
    lost peer comes first, then one with a message, then the earliest, then the lowest rank."""
    return min(
        failures, key=lambda f: (not f.message or f.lost_peer, not f.message, f.timestamp or float("inf"), f.rank)
    )


class WorkerFailed(LinaError):
    """A worker failed and the job was stopped. ``failure`` is the root cause; ``others`` the
    ranks that failed after it (usually from losing that peer)."""

    def __init__(self, failure: WorkerFailure, others: list[WorkerFailure] | None = None, verbose: bool = False):
        self.failure = failure
        self.others = list(others or [])
        cls = lina_error_class(failure.error_type)
        self.exit_code = cls.exit_code if cls is not None else 1
        where = f"rank {failure.rank} on host {failure.host} failed ({failure.how}"
        msg = f"{where}): {failure.text}" if failure.message else f"{where}, no error message)"
        msg += "; all workers were stopped"
        if self.others:
            others = sorted(self.others, key=lambda f: f.rank)
            msg += "; also failed: " + ", ".join(f"rank {f.rank} ({f.how})" for f in others)
        if verbose and failure.traceback:
            msg += "\n" + failure.traceback.rstrip()
        elif cls is None and failure.message:
            msg += ". Its Python traceback is shown with --verbose"
        super().__init__(msg)


def raise_for(failures: list[WorkerFailure], verbose: bool = False) -> None:
    """Raise :class:`WorkerFailed` for the root cause among ``failures`` (nothing when empty)."""
    if not failures:
        return
    first = root_cause(failures)
    raise WorkerFailed(first, [f for f in failures if f is not first], verbose) from None


def run_recorded(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a worker's entry point ``fn(*args)`` as ``python -m`` under torchrun: an exception is
    written to the elastic error file (:func:`torch.distributed.elastic.multiprocessing.errors.record`)
    and the process exits 1 without printing a traceback, since the launcher reports it. Outside
    an elastic launcher (no error file) the exception propagates as usual."""
    from torch.distributed.elastic.multiprocessing.errors import record

    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return fn(*args)
    try:
        return record(fn)(*args)
    except Exception:  # recorded in the error file by record(); the launcher prints it
        sys.exit(1)

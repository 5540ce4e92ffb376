"""Start W local worker processes with PyTorch's elastic launcher (its rendezvous, its process
supervision): when one worker dies, the launcher stops the others and we report which rank failed.
Under ``torchrun`` no launcher is needed: the process already is a worker."""

from __future__ import annotations

import logging
import os
import signal
import socket
import uuid
from typing import Any, Callable

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from lina.errors import LinaError


def under_torchrun() -> bool:
    """True inside a process started by torchrun / torch.distributed.run (it sets these)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(fn: Callable[..., Any], args: tuple, workers: int, monitor_interval_s: float = 0.5) -> dict[int, Any]:
    """Run ``fn(*args)`` on ``workers`` local processes; returns {rank: return value}.

    Raises:
        LinaError: naming the failed rank(s) and exit codes, once every worker has been stopped.
    """
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=workers,
        run_id=f"lina-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=monitor_interval_s,
        start_method="spawn",
    )
    # The elastic agent installs its own SIGTERM/SIGINT/... handlers in this process; put ours back
    # afterwards so later work here (e.g. building an emulated cluster) sees the usual signals.
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    try:
        return elastic_launch(config, fn)(*args)
    except ChildFailedError as err:
        lines = []
        for rank, failure in sorted(err.failures.items()):
            reason = failure.message if failure.message and failure.message != "<N/A>" else ""
            signal_or_code = f"exit code {failure.exitcode}" if failure.exitcode >= 0 else f"signal {-failure.exitcode}"
            lines.append(f"rank {rank} failed ({signal_or_code}){': ' + reason.splitlines()[-1] if reason else ''}")
        raise LinaError("a worker failed and the job was stopped: " + "; ".join(lines)) from None
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)

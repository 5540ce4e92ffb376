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

from lina.cluster.failures import WorkerFailure, parse_error_data, raise_for


def under_torchrun() -> bool:
    """True inside a process started by torchrun / torch.distributed.run (it sets these)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(
    fn: Callable[..., Any], args: tuple, workers: int, monitor_interval_s: float = 0.5, verbose: bool = False
) -> dict[int, Any]:
    """Run ``fn(*args)`` on ``workers`` local processes; returns {rank: return value}.

    Args:
        verbose: add the failed worker's Python traceback to the error.
    Raises:
        lina.cluster.failures.WorkerFailed: once every worker has been stopped; its message is the
            failed worker's own error line (read from its elastic error file), rank and host, its
            exit code that of the worker's LinaError (2 for a ConfigError), else 1.
    """
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
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
        host = socket.gethostname()
        failures = []
        for rank, failure in sorted(err.failures.items()):
            message, callstack, stamp = parse_error_data(failure.error_file_data)
            failures.append(WorkerFailure(rank, host, failure.exitcode, message, callstack, stamp or failure.timestamp))
        raise_for(failures, verbose)
        raise
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)

"""Run a function on W local Gloo ranks and collect what each returns.

``run_ranks(fn, world, *args)`` spawns W processes, initialises the default process group from a
shared file, calls ``fn(rank, world, *args)`` and returns the list of results (anything
``torch.save`` can store). A rank that raises or dies fails the whole call with its rank named;
no process outlives the call. ``timeout_s`` is the process group's collective timeout; the call
waits ``join_timeout_s`` (default twice that) for the ranks, start-up included.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lina.cluster.teardown import leave_distributed
from lina.errors import LinaError


def _entry(rank: int, world: int, init_file: str, out_dir: str, fn: Callable, args: tuple, timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        leave_distributed()


def run_ranks(
    fn: Callable, world: int, *args: Any, timeout_s: float = 60.0, join_timeout_s: float | None = None
) -> list[Any]:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        ctx = mp.start_processes(
            _entry, args=(world, init_file, tmp, fn, args, timeout_s), nprocs=world, join=False, start_method="spawn"
        )
        try:
            wait_s = join_timeout_s if join_timeout_s is not None else timeout_s * 2
            deadline = time.monotonic() + wait_s
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise LinaError(f"ranks did not finish within {wait_s:g} s (a collective hangs?); all were stopped")
        except mp.ProcessRaisedException as err:
            errs = sorted(Path(tmp).glob("rank*.err"))
            detail = errs[0].read_text() if errs else str(err)
            raise LinaError(f"rank {err.error_index} failed:\n{detail}") from None
        except mp.ProcessExitedException as err:
            raise LinaError(f"rank {err.error_index} exited with code {err.exit_code}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]

"""Leaving the process group so that nothing of it outlives the worker's Python interpreter.

``destroy_process_group`` only drops torch's registry entries; a Gloo group stays alive (with
its run-loop threads) while any Python object still refers to it, for example through a
reference cycle. If it is still alive when the interpreter shuts down, a run-loop thread that
releases a finished collective must take the GIL to free its tensors, and a thread that asks
for the GIL during shutdown aborts the process ("terminate called without an active
exception") after all the work is done. :func:`leave_distributed` frees the groups while the
interpreter is whole."""

from __future__ import annotations

import gc

import torch.distributed as dist


def leave_distributed() -> None:
    """Destroy every process group of this process and free them now (their threads joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # groups held only by reference cycles (engine <-> policy) are freed here

"""Spans around every collective a peer framework issues, in lina's timeline format.

DeepSpeed sends all its communication through one backend object (``deepspeed.comm.comm.cdb``, a
``TorchBackend``): the MoE all-to-alls, the dropless gate's capacity agreement, ZeRO's gradient
reductions and ZeRO-2's all-gather of updated partitions. :func:`record_collectives` wraps that
object's collective methods so each call leaves one span in a :class:`lina.obs.timeline.Timeline`,
with the same categories lina's own code uses, so :func:`lina.obs.report.step_breakdown` reads a
peer's steps exactly as it reads lina's:

  ``a2a``        ``all_to_all_single`` / ``all_to_all``; args ``phase`` (``fwd``/``bwd``, from
                 :class:`Phase`) and ``bytes`` (bytes sent to other ranks)
  ``allreduce``  gradient reductions (``all_reduce``, ``reduce``, ``reduce_scatter*``) and
                 ZeRO-2's all-gather of updated parameters (``all_gather*``): the gradient sync
  ``sched``      single-element collectives (the gate's capacity maximum, norms): bookkeeping

An asynchronous call (``async_op=True``) is recorded from its start to the completion of its
work, like lina's own asynchronous allreduces.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lina.obs import schema
from lina.obs.timeline import Timeline

A2A_METHODS = ("all_to_all_single", "all_to_all")
SYNC_METHODS = (
    "all_reduce",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_base",
    "all_gather_coalesced",
)


@dataclass
class Phase:
    """Which part of a step runs now (``fwd``, ``bwd``, ``step``); set by the peer's step loop."""

    name: str = "fwd"


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    found = []
    for value in list(args) + list(kwargs.values()):
        if torch.is_tensor(value):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if torch.is_tensor(v))
    return found


def _input_bytes(method: str, args: tuple, kwargs: dict) -> int:
    """Bytes of the tensor a call sends (for all-to-all: its input, the second tensor argument)."""
    tensors = _tensors(args, kwargs)
    if not tensors:
        return 0
    t = tensors[1] if method == "all_to_all_single" and len(tensors) > 1 else tensors[0]
    return t.numel() * t.element_size()


_KINDS = {"a2a": schema.ALLTOALL, "allreduce": schema.ALLREDUCE, "sched": schema.OTHER}


def _classify(method: str, args: tuple, kwargs: dict) -> str:
    if method in A2A_METHODS:
        return "a2a"
    tensors = _tensors(args, kwargs)
    if tensors and max(t.numel() for t in tensors) <= 1:
        return "sched"
    return "allreduce"


def record_collectives(backend: Any, timeline: Timeline, phase: Phase, world_of: Callable[[Any], int]) -> None:
    """Send the spans of every collective called on ``backend`` to ``timeline`` from now on.

    The first call wraps ``backend``'s collective methods in place (once); later calls only
    re-point the wrappers, so several peers of one process can take turns on one backend.

    Args:
        backend: the object the peer calls its collectives on (DeepSpeed's ``TorchBackend``).
        timeline: where the spans go.
        phase: read at each call to tag it ``fwd``, ``bwd`` or ``step``.
        world_of: the size of a call's process group (``group`` argument, None for the world), to
            count the bytes an all-to-all sends to other ranks: input bytes x (P - 1) / P.
    """
    backend._lina_spans = (timeline, phase, world_of)
    for method in A2A_METHODS + SYNC_METHODS:
        original = getattr(backend, method, None)
        if original is None or getattr(original, "_lina_recorded", False):
            continue
        setattr(backend, method, _recorded(method, original, backend))


def _recorded(method: str, original: Callable, backend: Any) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def call(*args, **kwargs):
        timeline, phase, world_of = backend._lina_spans
        bound = signature.bind_partial(*args, **kwargs).arguments
        cat = _classify(method, args, kwargs)
        span_args: dict = {
            "op": method,
            "kind": _KINDS[cat],
            "phase": phase.name if phase.name in schema.PHASES else None,
        }
        nbytes = _input_bytes(method, args, kwargs)
        if cat == "a2a":
            world = max(1, world_of(bound.get("group")))
            nbytes = nbytes * (world - 1) // world
        span_args["bytes"] = nbytes
        name = f"{phase.name}.{method}"
        start = timeline.now()
        work = original(*args, **kwargs)
        future = getattr(work, "get_future", None) if bound.get("async_op") else None
        if future is not None:
            future().add_done_callback(
                lambda _f: timeline.record(name, cat, start, timeline.now(), thread="comm", **span_args)
            )
        else:
            timeline.record(name, cat, start, timeline.now(), **span_args)
        return work

    call._lina_recorded = True
    return call

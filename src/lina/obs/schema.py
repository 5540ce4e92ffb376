"""The run schema: what a span means, and what a run folder records about its run.

A span's meaning lives in typed fields, never in its name (the name is a display label):

- ``kind``: what ran (one of :data:`KINDS`: ``expert`` is an expert FFN, ``dispatch`` /
  ``combine`` the token all-to-alls of a MoE layer, ``counts`` the per-expert token counts
  before a dispatch, ``allreduce`` a gradient allreduce (bucket or micro-op), ...);
- ``layer``: the MoE layer index (``None`` outside one);
- ``phase``: ``"fwd"`` or ``"bwd"``, the pass it belongs to (``None``: neither);
- ``micro_op``: index of a pipelined micro-op (``None``: not split);
- ``bytes``: bytes this rank sends (all-to-all: to the other ranks; allreduce: the gradient);
- ``peer``: the other rank of a point-to-point transfer (``None``: a collective).

Extras that only some readers need (``step``, ``policy``, ``seq``, ``queue_wait_s``, ...) stay in
``Span.args``.

A run folder (``lina train --trace``, ``lina bench train``'s ``runs/``) holds
``timeline-rank{R}.jsonl`` (one span per line, each with ``"v": SCHEMA_VERSION``) and
``summary.json`` (:func:`run_summary`: ``schema_version``, the config, the chosen chunk size, the
backend and :func:`lina.obs.provenance.provenance`).

Version 1 (before typed fields) put the meaning into names and ``args``: trainer spans were
``moe3.dispatch`` with ``args={"phase": "fwd", "bytes": ...}``, simulator spans
``fwd.dispatch.L3.c0`` with ``args={"phase": "dispatch", "direction": "fwd", "chunk": 0}``.
:func:`classify_v1` is the one place that still reads names: it fills the typed fields of a span
recorded without a ``kind`` (a line of a version-1 file, or a caller that gives none).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from lina.errors import LinaError
from lina.obs.provenance import provenance

if TYPE_CHECKING:
    from lina.obs.timeline import Span

SCHEMA_VERSION = 2

# --- span kinds --------------------------------------------------------------------------------
STEP = "step"  # one training step (cat step; args: step, policy)
BATCH = "batch"  # one inference batch (cat step)
FORWARD = "forward"  # the forward pass of a step
BACKWARD = "backward"  # the backward pass of a step
EXPERT = "expert"  # expert FFN compute of one MoE layer (or one micro-op of it)
DENSE = "dense"  # non-expert layer compute (the simulator's tasks)
HEAD = "head"  # embedding/head compute (the simulator's tasks)
OPTIMIZER = "optimizer"  # the optimizer step
DISPATCH = "dispatch"  # tokens to their experts (all-to-all)
COMBINE = "combine"  # expert outputs back to their tokens (all-to-all)
COUNTS = "counts"  # per-expert token counts before a dropless dispatch (all-to-all)
DISPATCH_HEADER = "dispatch_header"  # inference: counts and estimates before a dispatch
ALLTOALL = "alltoall"  # an all-to-all outside a MoE layer (benchmarks)
ALLREDUCE = "allreduce"  # a gradient allreduce: a bucket or one micro-op
SYNC_WAIT = "sync_wait"  # waiting after backward for the gradient sync to finish
PARTITION = "partition"  # Lina's gradient partitioning and concatenation
A2A_SLOT = "a2a_slot"  # the slot the scheduler gave an all-to-all (cat sched)
HOLD = "hold"  # the scheduler holds allreduce micro-ops back for the next all-to-all
REPACK = "repack"  # the packing controller changes experts per rank
PLAN_ESTIMATE = "plan_estimate"  # inference, Lina phase 1: the coordinator plans the next layer
PLACEMENT = "placement"  # inference, Lina phase 2: this layer's placement from the real counts
OTHER = "other"

KINDS = (
    STEP,
    BATCH,
    FORWARD,
    BACKWARD,
    EXPERT,
    DENSE,
    HEAD,
    OPTIMIZER,
    DISPATCH,
    COMBINE,
    COUNTS,
    DISPATCH_HEADER,
    ALLTOALL,
    ALLREDUCE,
    SYNC_WAIT,
    PARTITION,
    A2A_SLOT,
    HOLD,
    REPACK,
    PLAN_ESTIMATE,
    PLACEMENT,
    OTHER,
)
TOKEN_A2A = (DISPATCH, COMBINE)  # the all-to-alls that move tokens
PASSES = (FORWARD, BACKWARD)
PHASES = ("fwd", "bwd")

FIELDS = ("kind", "layer", "phase", "micro_op", "bytes", "peer")  # the typed fields of a span

# --- reading spans -----------------------------------------------------------------------------


def fields_of(span: Span) -> dict[str, Any]:
    """The typed fields of ``span`` as keywords of :meth:`lina.obs.timeline.Timeline.record`."""
    return {name: getattr(span, name) for name in FIELDS}


# --- version 1: meaning from names -------------------------------------------------------------

_V1_MOE = re.compile(r"^moe(\d+)\.(experts\.bwd|experts|dispatch-header|dispatch|combine|phase1|phase2)$")
_V1_MOE_KIND = {
    "experts": EXPERT,
    "experts.bwd": EXPERT,
    "dispatch": DISPATCH,
    "combine": COMBINE,
    "dispatch-header": DISPATCH_HEADER,
    "phase1": PLAN_ESTIMATE,
    "phase2": PLACEMENT,
}
_V1_SIM = re.compile(r"^(fwd|bwd)\.(\w+)\.L(\d+)(?:\.c(\d+))?$")
_V1_NAMES = {
    ("step", "step"): STEP,
    ("batch", "step"): BATCH,
    ("forward", "compute"): FORWARD,
    ("backward", "compute"): BACKWARD,
    ("counts", "a2a"): COUNTS,
    ("gradsync.finish", "sched"): SYNC_WAIT,
    ("partition", "sched"): PARTITION,
    ("hold", "sched"): HOLD,
    ("packing.repack", "sched"): REPACK,
    ("optimizer", "compute"): OPTIMIZER,
    ("head.fwd", "compute"): HEAD,
    ("head.bwd", "compute"): HEAD,
}
_V1_SIM_KINDS = {
    "dispatch": DISPATCH,
    "combine": COMBINE,
    "counts": COUNTS,
    "expert": EXPERT,
    "dense": DENSE,
    "ffn": DENSE,
    "head": HEAD,
    "optimizer": OPTIMIZER,
}


def classify_v1(span: Span) -> None:
    """Fill the typed fields of ``span`` (recorded without a ``kind``) from its name and args, as
    version 1 wrote them; the args that became fields leave ``span.args``."""
    args = span.args = dict(span.args)

    def take(name: str, *keys: str):
        value = getattr(span, name)
        for key in keys:
            found = args.pop(key, None)
            value = found if value is None else value
        return value

    phase, direction, kind = take("phase", "phase"), args.pop("direction", None), args.pop("kind", None)
    layer, micro_op, nbytes, peer = (
        take("layer", "layer"),
        take("micro_op", "micro_op", "chunk"),
        take("bytes", "bytes"),
        take("peer", "peer"),
    )
    if phase in (DISPATCH, COMBINE, COUNTS):  # the simulator's all-to-all tasks
        kind, phase = phase, direction
    elif phase not in PHASES:
        phase = direction if direction in PHASES else None
    kind = _V1_SIM_KINDS.get(kind, kind)
    if kind is None:
        kind = _v1_kind_from_name(span)
    m = _V1_MOE.match(span.name)
    if m:
        layer = int(m.group(1)) if layer is None else layer
        if m.group(2) == "experts.bwd":
            phase = "bwd"
        elif phase is None and m.group(2) in ("experts", "dispatch-header"):
            phase = "fwd"
    m = _V1_SIM.match(span.name)
    if m:
        phase = phase or m.group(1)
        layer = int(m.group(3)) if layer is None else layer
        if micro_op is None and m.group(4) is not None:
            micro_op = int(m.group(4))
    if kind in PASSES and phase is None:
        phase = "fwd" if kind == FORWARD else "bwd"
    if kind == HEAD and phase is None:
        phase = span.name.rpartition(".")[2] if span.name.endswith((".fwd", ".bwd")) else None
    span.kind, span.layer, span.phase, span.micro_op, span.bytes, span.peer = kind, layer, phase, micro_op, nbytes, peer


def _v1_kind_from_name(span: Span) -> str:
    named = _V1_NAMES.get((span.name, span.cat))
    if named is not None:
        return named
    m = _V1_MOE.match(span.name)
    if m:
        return _V1_MOE_KIND[m.group(2)]
    m = _V1_SIM.match(span.name)
    if m and m.group(2) in _V1_SIM_KINDS:
        return _V1_SIM_KINDS[m.group(2)]
    if span.name.startswith("a2a-slot:"):
        return A2A_SLOT
    if span.cat == "allreduce":
        return ALLREDUCE
    if span.cat == "a2a":
        return ALLTOALL
    return OTHER


# --- the run summary ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSetup:
    """What ran, in one spelling for every producer (the trainer, ``lina bench train``, the
    simulator's synthetic runs): the model's shape, the layout, the policy and its settings.

    Args:
        layers, d_model, d_ff, experts, top_k, seq_len, vocab, moe_every: the model's shape.
        batch_size: sequences per rank per step.
        workers: ranks; ``hosts`` x ``workers_per_host`` of them (``None``: not known, e.g. a
            plain loopback run).
        link_bps: each host's link rate, bits/s (``None``: no shaped link).
        policy: the training policy that ran.
        chunk_mb: the micro-op size the run used (what ``auto`` chose).
        bucket_mb, pipeline_chunks, coalesce_small: the policies' other settings.
        ep_size: ranks of one expert-parallel group (``None``: all ranks or ``experts``).
        backend: the process group's backend (``gloo``, ``nccl``).
        cpu_count: cores of the machine the ranks shared (``None``: not recorded).
        a2a_in_flight: all-to-all operations a rank runs at once, when the producer knows it
            (``None``: from the backend).
    """

    layers: int
    d_model: int
    d_ff: int
    experts: int
    top_k: int
    seq_len: int
    batch_size: int
    workers: int
    policy: str
    chunk_mb: float
    vocab: int = 256
    moe_every: int = 1
    hosts: int | None = None
    workers_per_host: int | None = None
    link_bps: float | None = None
    bucket_mb: float = 25.0
    pipeline_chunks: int = 2
    coalesce_small: bool = True
    ep_size: int | None = None
    backend: str = "gloo"
    cpu_count: int | None = None
    a2a_in_flight: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "summary.json") -> RunSetup:
        """Raises:
        LinaError: a field is unknown or a required one is missing."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LinaError(
                f"{where}: 'setup' has unknown field(s) {', '.join(unknown)}; was it written by a newer lina?"
            )
        try:
            return cls(**data)
        except TypeError as err:
            raise LinaError(f"{where}: 'setup' is incomplete ({err})") from None


def run_summary(
    setup: RunSetup, config: dict[str, Any], step_time_s_median: float | None, **extra: Any
) -> dict[str, Any]:
    """The ``summary.json`` of a run folder: ``schema_version``, ``setup`` (:class:`RunSetup`),
    the producer's own ``config``, ``step_time_s_median``, ``backend``, ``chunk_mb_resolved``,
    ``provenance`` (versions, command line, commit) and ``extra``."""
    return {
        "schema_version": SCHEMA_VERSION,
        "setup": setup.to_dict(),
        "config": config,
        "step_time_s_median": step_time_s_median,
        "backend": setup.backend,
        "chunk_mb_resolved": setup.chunk_mb,
        **extra,
        "provenance": provenance(),
    }


def summary_version(summary: dict[str, Any], where: str = "summary.json") -> int:
    """The schema version of a ``summary.json`` (1 when it has none).

    Raises:
        LinaError: the summary is of a newer version than this lina reads.
    """
    version = summary.get("schema_version", 1)
    if not isinstance(version, int) or version < 1 or version > SCHEMA_VERSION:
        raise LinaError(
            f"{where}: schema_version {version!r}; this lina reads versions 1 to {SCHEMA_VERSION}: "
            "upgrade lina to read it"
        )
    return version

"""From a run's timelines to what the fit needs: per-step compute of every rank, and the
durations of uncontended collectives timed across ranks.

What the timelines must contain, per rank (fields of :mod:`lina.obs.schema`): ``step`` spans;
``forward`` and ``backward`` pass spans; ``expert`` compute spans with their ``phase``; all-to-all
spans (cat ``a2a``) with ``bytes`` (what the rank sends to the other ranks) and ``phase``;
allreduce spans with ``bytes``. Ranks' span times must share one clock (the host's monotonic clock
does): collectives are timed across ranks.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lina.errors import LinaError
from lina.obs import schema
from lina.obs.timeline import Span, intersection_length, union_length

if TYPE_CHECKING:
    from lina.sim.calibration.runs import RunRecord


def median(xs):
    """The median of ``xs``, 0.0 when empty."""
    return statistics.median(xs) if xs else 0.0


def _instances(
    by_step: dict[int, list[list[Span]]],
    contended: set[int],
    busy_by_step: dict[int, list[list[tuple[float, float]]]] | None = None,
) -> list[tuple[float, float, float]]:
    """(bytes the mean rank sends, last exit - last arrival, share of that time the mean rank
    computes) of every uncontended collective that every rank ran (steps whose ranks ran
    different numbers of them are left out). ``busy_by_step``: per step, per rank, its compute
    intervals (none given: the share is 0)."""
    out = []
    for k, per_rank in by_step.items():
        if len({len(spans) for spans in per_rank}) != 1:
            continue
        busy = busy_by_step.get(k) if busy_by_step else None
        for same in zip(*per_rank):
            if any(id(s) in contended for s in same):
                continue
            start, end = max(s.start_s for s in same), max(s.end_s for s in same)
            if end <= start:
                continue
            share = 0.0
            if busy and len(busy) == len(same):
                share = sum(intersection_length([(start, end)], b) for b in busy) / len(busy) / (end - start)
            out.append((sum(float(s.bytes) for s in same) / len(same), end - start, share))
    return out


def _overlaps(span: Span, others: list[Span]) -> bool:
    return any(o is not span and o.start_s < span.end_s and span.start_s < o.end_s for o in others)


@dataclass
class StepObs:
    fwd_dense_s: float  # forward pass neither in an all-to-all nor in expert compute
    fwd_expert_s: float
    bwd_rest_s: float  # backward pass neither in an all-to-all nor in a *recorded* backward expert span
    bwd_expert_s: float | None  # None when backward expert compute has no spans of its own
    tail_s: float  # after backward and every allreduce: optimizer
    # compute time spent with a collective in flight (the contention the slowdowns are fitted to):
    a2a_overlap_fwd_s: float = 0.0  # expert compute during an all-to-all, forward
    a2a_overlap_bwd_s: float = 0.0
    allreduce_overlap_fwd_s: float = 0.0  # compute during an allreduce and no all-to-all
    allreduce_overlap_bwd_s: float = 0.0

    @property
    def compute_s(self) -> float:
        return self.fwd_dense_s + self.fwd_expert_s + self.bwd_rest_s + (self.bwd_expert_s or 0.0)

    @property
    def a2a_overlap_s(self) -> float:
        return self.a2a_overlap_fwd_s + self.a2a_overlap_bwd_s

    @property
    def allreduce_overlap_s(self) -> float:
        return self.allreduce_overlap_fwd_s + self.allreduce_overlap_bwd_s


def _clip(intervals: list[tuple[float, float]], window: Span) -> list[tuple[float, float]]:
    out = [(max(a, window.start_s), min(b, window.end_s)) for a, b in intervals]
    return [(a, b) for a, b in out if b > a]


def _overlaps_in_pass(
    pass_span: Span,
    a2a: list[tuple[float, float]],
    allreduce: list[tuple[float, float]],
    experts: list[tuple[float, float]],
) -> tuple[float, float]:
    """(expert compute during an all-to-all, compute during an allreduce but no all-to-all) in a pass.

    Compute is taken to run whenever the pass is neither waiting on an all-to-all nor idle, and in
    every expert span (which may overlap a pipelined all-to-all).
    """
    a2a, ar = _clip(a2a, pass_span), _clip(allreduce, pass_span)
    in_a2a = intersection_length(_clip(experts, pass_span), a2a)
    in_ar = union_length(ar) - intersection_length(ar, a2a)
    return in_a2a, in_ar


@dataclass
class RunObs:
    steps: list[StepObs]
    a2a: list[tuple[float, float]]  # (bytes the mean rank sends, seconds across ranks), forward, uncontended
    allreduce: list[
        tuple[float, float, float]
    ]  # (bytes, seconds across ranks, share of it the ranks compute), not beside an a2a
    sync_wait_s: float = (
        0.0  # per step: the last rank's arrivals at all-to-alls beyond the mean rank's compute before them
    )

    @property
    def compute_s(self) -> float:
        """Median compute per step of a rank."""
        return median([s.compute_s for s in self.steps])


def observe(run: RunRecord, skip_first: bool = True) -> RunObs:
    """Per-step compute totals of every rank, and uncontended collective durations.

    A collective is timed across ranks (their clocks are the host's monotonic clock): from the
    last rank's arrival to the last rank's exit, so a rank that waits in it for a slower peer does
    not count as network time; its bytes are what the mean rank sends. One instance is the j-th
    forward all-to-all (or allreduce) of a step on every rank; it is uncontended when no rank
    runs another collective beside it.
    """
    steps = []
    a2a_by_step: dict[int, list[list[Span]]] = {}  # step index -> per rank, its forward a2a spans in order
    all_a2a_by_step: dict[int, list[list[Span]]] = {}  # the same, every all-to-all
    ar_by_step: dict[int, list[list[Span]]] = {}
    busy_by_step: dict[int, list[list[tuple[float, float]]]] = {}  # step -> per rank, its forward and backward passes
    contended: set[int] = set()  # id() of spans that overlap another collective on their rank
    for spans in run.spans.values():
        windows = sorted((s for s in spans if s.cat == "step"), key=lambda s: s.start_s)
        if skip_first and len(windows) >= 3:
            windows = windows[1:]
        for k, w in enumerate(windows):
            inside = [
                s for s in spans if s.cat != "step" and s.start_s >= w.start_s - 1e-9 and s.end_s <= w.end_s + 1e-9
            ]
            a2as = sorted((s for s in inside if s.cat == "a2a"), key=lambda s: s.start_s)
            ars = sorted((s for s in inside if s.cat == "allreduce"), key=lambda s: s.start_s)
            for s in a2as:
                if _overlaps(s, a2as):
                    contended.add(id(s))
            for s in ars:
                if _overlaps(s, a2as) or _overlaps(s, ars):
                    contended.add(id(s))
            a2a_by_step.setdefault(k, []).append([s for s in a2as if s.phase == "fwd" and s.bytes is not None])
            all_a2a_by_step.setdefault(k, []).append(a2as)
            ar_by_step.setdefault(k, []).append([s for s in ars if s.bytes is not None])
            busy_by_step.setdefault(k, []).append(
                [(s.start_s, s.end_s) for s in inside if s.cat == "compute" and s.kind in schema.PASSES]
            )
            fwd = next((s for s in inside if s.cat == "compute" and s.kind == schema.FORWARD), None)
            bwd = next((s for s in inside if s.cat == "compute" and s.kind == schema.BACKWARD), None)
            if fwd is None or bwd is None:
                continue

            experts = [s for s in inside if s.cat == "compute" and s.kind == schema.EXPERT]
            e_fwd = [s for s in experts if s.phase != "bwd"]
            e_bwd = [s for s in experts if s.phase == "bwd"]

            def rest(pass_span: Span, busy: list[Span]) -> float:
                cut = [(max(s.start_s, pass_span.start_s), min(s.end_s, pass_span.end_s)) for s in a2as + busy]
                return pass_span.dur_s - union_length([(a, b) for a, b in cut if b > a])

            done = max([bwd.end_s] + [s.end_s for s in ars])
            a2a_iv = [(s.start_s, s.end_s) for s in a2as]
            ar_iv = [(s.start_s, s.end_s) for s in ars]
            ov_fwd = _overlaps_in_pass(fwd, a2a_iv, ar_iv, [(s.start_s, s.end_s) for s in e_fwd])
            ov_bwd = _overlaps_in_pass(bwd, a2a_iv, ar_iv, [(s.start_s, s.end_s) for s in e_bwd])
            steps.append(
                StepObs(
                    fwd_dense_s=rest(fwd, e_fwd),
                    fwd_expert_s=sum(s.dur_s for s in e_fwd),
                    bwd_rest_s=rest(bwd, e_bwd),
                    bwd_expert_s=sum(s.dur_s for s in e_bwd) if e_bwd else None,
                    tail_s=w.end_s - done,
                    a2a_overlap_fwd_s=ov_fwd[0],
                    a2a_overlap_bwd_s=ov_bwd[0],
                    allreduce_overlap_fwd_s=ov_fwd[1],
                    allreduce_overlap_bwd_s=ov_bwd[1],
                )
            )
    a2a = [(b, d) for b, d, _ in _instances(a2a_by_step, contended)]
    allreduce = _instances(ar_by_step, contended, busy_by_step)
    waits = []
    for per_rank in all_a2a_by_step.values():
        if len(per_rank) < 2 or len({len(spans) for spans in per_rank}) != 1:
            continue
        instances = list(zip(*per_rank))
        late = 0.0
        for done, nxt in zip(instances, instances[1:]):
            if any(id(x) in contended for x in done + nxt):
                continue
            # after the last rank leaves one all-to-all, the next starts when the last rank arrives:
            # what that takes beyond the mean rank's compute in between is straggling
            mean_gap = sum(b.start_s - a.end_s for a, b in zip(done, nxt)) / len(done)
            late += max(b.start_s for b in nxt) - max(a.end_s for a in done) - mean_gap
        waits.append(late)
    if not steps:
        raise LinaError(f"{run.path}: no step with 'forward' and 'backward' compute spans")
    return RunObs(steps, a2a, allreduce, median(waits))

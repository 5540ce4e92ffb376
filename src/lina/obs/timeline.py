"""One timeline: every compute and communication span on a rank goes through a recorder.

Breakdowns, Chrome traces, plots and the simulator's calibration all read these spans.
Times are ``time.perf_counter()`` seconds (CLOCK_MONOTONIC on Linux, shared by every
process on one machine, so spans of different ranks line up).

What a span means is in its typed fields (``kind``, ``layer``, ``phase``, ``micro_op``, ``bytes``,
``peer``: see :mod:`lina.obs.schema`); its name is a display label.

Categories used across the project (``cat``):
  ``compute``    forward/backward compute of a layer or expert FFN
  ``a2a``        an all-to-all (dispatch or combine), possibly one micro-op of it
  ``allreduce``  a gradient allreduce (a bucket or one micro-op)
  ``sched``      the scheduler's own bookkeeping
  ``step``       one whole training step / inference batch
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from lina.errors import LinaError
from lina.obs import schema

CATEGORIES = ("compute", "a2a", "allreduce", "sched", "step", "idle", "other")


@dataclass
class Span:
    """One timed operation of one rank.

    Args:
        name: display label (never parsed: the meaning is in the typed fields).
        cat: category (:data:`CATEGORIES`).
        kind, layer, phase, micro_op, bytes, peer: the typed fields of :mod:`lina.obs.schema`;
            a span built without ``kind`` gets them from its name and args, as version 1 of the
            schema wrote them (:func:`lina.obs.schema.classify_v1`).
        args: extras (``step``, ``policy``, ...).
    """

    name: str
    cat: str
    start_s: float
    end_s: float
    rank: int = 0
    thread: str = "main"
    args: dict = field(default_factory=dict)
    kind: str | None = None
    layer: int | None = None
    phase: str | None = None
    micro_op: int | None = None
    bytes: float | None = None
    peer: int | None = None

    def __post_init__(self):
        if self.kind is None:
            schema.classify_v1(self)

    @property
    def dur_s(self) -> float:
        return self.end_s - self.start_s


class Timeline:
    """Thread-safe span recorder for one rank.

    A long run keeps its memory bounded with :meth:`drop_before` (the trainer drops what no
    measurement needs any more after every step); with ``spill_path`` the dropped spans go to that
    JSONL file instead of away, so a trace of a long run is complete without being held in memory
    (:meth:`flush` writes the rest at the end).

    Args:
        rank: global rank the spans belong to.
        enabled: when False, ``span`` and ``record`` cost almost nothing and keep nothing.
        spill_path: JSONL file for dropped spans (created empty here); None: dropped spans are gone.
    """

    def __init__(self, rank: int = 0, enabled: bool = True, spill_path: str | Path | None = None):
        self.rank = rank
        self.enabled = enabled
        self._spans: list[Span] = []
        self._lock = threading.Lock()
        self.spill_path = Path(spill_path) if spill_path is not None else None
        self.spilled = 0  # spans written to spill_path so far
        if self.spill_path is not None:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            self.spill_path.write_text("")

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def record(
        self,
        name: str,
        cat: str,
        start_s: float,
        end_s: float,
        thread: str | None = None,
        *,
        kind: str | None = None,
        layer: int | None = None,
        phase: str | None = None,
        micro_op: int | None = None,
        bytes: float | None = None,
        peer: int | None = None,
        **args,
    ) -> None:
        """Keep one finished span (typed fields as in :class:`Span`; other keywords go to ``args``)."""
        if not self.enabled:
            return
        span = Span(
            name,
            cat,
            start_s,
            end_s,
            self.rank,
            thread or threading.current_thread().name,
            args,
            kind,
            layer,
            phase,
            micro_op,
            bytes,
            peer,
        )
        with self._lock:
            self._spans.append(span)

    @contextlib.contextmanager
    def span(self, name: str, cat: str, thread: str | None = None, **fields) -> Iterator[None]:
        """Time the body of a ``with`` block as one span."""
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, cat, start, time.perf_counter(), thread=thread, **fields)

    def spans(self, since_s: float | None = None) -> list[Span]:
        with self._lock:
            if since_s is None:
                return list(self._spans)
            return [s for s in self._spans if s.start_s >= since_s]

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def drop_before(self, end_s: float) -> int:
        """Forget the spans that ended before ``end_s`` (to ``spill_path`` when set); spans still
        open then, or recorded later, stay. Returns how many were dropped."""
        with self._lock:
            old = [s for s in self._spans if s.end_s < end_s]
            if old:
                self._spans = [s for s in self._spans if s.end_s >= end_s]
        self._spill(old)
        return len(old)

    def flush(self) -> None:
        """Spill every span still held (the end of a run with ``spill_path``)."""
        with self._lock:
            held, self._spans = self._spans, []
        self._spill(held)

    def _spill(self, spans: list[Span]) -> None:
        if self.spill_path is None or not spans:
            return
        with open(self.spill_path, "a") as fh:
            _write_jsonl(fh, spans)
        self.spilled += len(spans)

    def total(self, cat: str, since_s: float | None = None, kind: str | None = None) -> float:
        """Sum of span durations of one category, of one ``kind`` when given (overlaps are counted twice)."""
        return sum(s.dur_s for s in self.spans(since_s) if s.cat == cat and (kind is None or s.kind == kind))

    def save_jsonl(self, path: str | Path) -> None:
        with open(path, "w") as fh:
            _write_jsonl(fh, self.spans())


def span_to_dict(span: Span) -> dict[str, Any]:
    """One line of a timeline file: version, label, times, the typed fields that are set, args."""
    out: dict[str, Any] = {
        "v": schema.SCHEMA_VERSION,
        "name": span.name,
        "cat": span.cat,
        "start_s": span.start_s,
        "end_s": span.end_s,
        "rank": span.rank,
        "thread": span.thread,
    }
    for name in schema.FIELDS:
        value = getattr(span, name)
        if value is not None:
            out[name] = value
    out["args"] = span.args
    return out


def span_from_dict(data: dict[str, Any], where: str = "timeline") -> Span:
    """A span from one line of a timeline file of version 1 (no ``"v"``) or :data:`schema.SCHEMA_VERSION`.

    Raises:
        LinaError: the line is of a newer version, or not a span.
    """
    data = dict(data)
    version = data.pop("v", 1)
    if not isinstance(version, int) or version > schema.SCHEMA_VERSION:
        raise LinaError(
            f"{where}: span of schema version {version!r}, newer than this lina reads "
            f"({schema.SCHEMA_VERSION}); upgrade lina to read it"
        )
    if version >= 2 and "kind" not in data:
        data["kind"] = schema.OTHER
    try:
        return Span(**data)
    except TypeError as err:
        raise LinaError(
            f"{where}: not a span of schema version {version} ({err}); give a timeline-rank*.jsonl file written by lina"
        ) from None


def _write_jsonl(fh, spans: list[Span]) -> None:
    for s in spans:
        fh.write(json.dumps(span_to_dict(s)) + "\n")


def load_jsonl(path: str | Path) -> list[Span]:
    """Read spans written by :meth:`Timeline.save_jsonl` (this schema version or version 1).

    Raises:
        LinaError: a line is not JSON, not a span, or of a newer schema version.
    """
    out = []
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    data = json.loads(line)
                except ValueError as err:
                    raise LinaError(f"{path}:{number}: not JSON ({err}); give a timeline written by lina") from None
                out.append(span_from_dict(data, f"{path}:{number}"))
    return out


def load_rank_timelines(folder: str | Path) -> dict[int, list[Span]]:
    """Every rank's spans of a run folder (``timeline-rank{R}.jsonl`` files): rank -> spans; empty
    when the folder has none."""
    return {
        int(f.stem.removeprefix("timeline-rank")): load_jsonl(f)
        for f in sorted(Path(folder).glob("timeline-rank*.jsonl"))
    }


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``[start, end)`` intervals (seconds)."""
    total = 0.0
    cur_s = cur_e = None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def intersection_length(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of union(a) intersected with union(b) (seconds); overlaps inside a side count once."""

    def merged(intervals: list[tuple[float, float]]) -> list[list[float]]:
        out: list[list[float]] = []
        for s, e in sorted(intervals):
            if out and s <= out[-1][1]:
                out[-1][1] = max(out[-1][1], e)
            else:
                out.append([s, e])
        return out

    x, y = merged(a), merged(b)
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        total += max(0.0, min(x[i][1], y[j][1]) - max(x[i][0], y[j][0]))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total

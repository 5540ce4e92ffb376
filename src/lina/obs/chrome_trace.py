"""Export spans as a Chrome trace (JSON object format), which Perfetto and chrome://tracing open."""

from __future__ import annotations

import json
from pathlib import Path

from lina.obs.schema import fields_of
from lina.obs.timeline import Span


def to_chrome_trace(spans: list[Span]) -> dict:
    """One process per rank, one track per (rank, thread); times in microseconds; an event's args
    are the span's typed fields (:mod:`lina.obs.schema`) that are set, then its extras."""
    if not spans:
        return {"traceEvents": [], "displayTimeUnit": "ms"}
    t0 = min(s.start_s for s in spans)
    events = []
    tids: dict[tuple[int, str], int] = {}
    for s in spans:
        key = (s.rank, s.thread)
        if key not in tids:
            tids[key] = len(tids)
            events.append(
                {"ph": "M", "name": "thread_name", "pid": s.rank, "tid": tids[key], "args": {"name": s.thread}}
            )
        events.append(
            {
                "ph": "X",
                "name": s.name,
                "cat": s.cat,
                "pid": s.rank,
                "tid": tids[key],
                "ts": (s.start_s - t0) * 1e6,
                "dur": max(s.dur_s, 0.0) * 1e6,
                "args": {**{k: v for k, v in fields_of(s).items() if v is not None}, **s.args},
            }
        )
    for rank in sorted({s.rank for s in spans}):
        events.append({"ph": "M", "name": "process_name", "pid": rank, "args": {"name": f"rank {rank}"}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(spans: list[Span], path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_chrome_trace(spans)))

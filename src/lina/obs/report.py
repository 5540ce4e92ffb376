"""Turn the timelines of a run (``timeline-rank{R}.jsonl`` in a folder) into a Chrome trace, a
breakdown table (compute, all-to-all total and exposed, allreduce, idle) and a timeline plot of
one step (PNG)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from lina.extras import pyplot
from lina.obs import schema
from lina.obs.chrome_trace import write_chrome_trace
from lina.obs.timeline import Span, intersection_length, load_rank_timelines, union_length


def load_run_spans(folder: Path) -> list[Span]:
    """Every rank's spans of a run folder, in one list."""
    return [s for spans in load_rank_timelines(folder).values() for s in spans]


def _is_expert_compute(s: Span) -> bool:
    """An expert-FFN span (forward or backward)."""
    return s.cat == "compute" and s.kind == schema.EXPERT


def _is_pass(s: Span) -> bool:
    """The forward or backward pass of a step."""
    return s.cat == "compute" and s.kind in schema.PASSES


def step_breakdown(spans: list[Span], step_span: Span) -> dict[str, float]:
    """Seconds of one step of one rank, every figure read off the timeline the same way.

    Keys: ``step``; ``compute`` (forward + backward outside all-to-all, expert FFNs included);
    ``a2a_total`` / ``a2a_fwd`` / ``a2a_bwd`` (union of all-to-all spans), ``a2a_exposed`` (not
    overlapped by expert compute), ``compute_busy_in_a2a`` (overlapped); ``allreduce_in_flight``
    and ``allreduce_exposed`` (waited for after backward); ``expert_compute``; ``partition``
    (Lina's gradient partitioning and concatenation); ``idle``; ``a2a_bytes``.
    """
    start, end = step_span.start_s, step_span.end_s
    mine = [s for s in spans if s.rank == step_span.rank and s.end_s > start and s.start_s < end]

    def clip(pred) -> list[tuple[float, float]]:
        return [(max(s.start_s, start), min(s.end_s, end)) for s in mine if pred(s)]

    a2a = clip(lambda s: s.cat == "a2a")
    experts = clip(_is_expert_compute)
    passes = clip(_is_pass)
    waits = clip(lambda s: s.kind == schema.SYNC_WAIT)
    a2a_total = union_length(a2a)
    busy_in_a2a = intersection_length(a2a, experts)
    step = end - start
    return {
        "step": step,
        "compute": max(0.0, union_length(passes) - a2a_total + busy_in_a2a),
        "a2a_total": a2a_total,
        "a2a_fwd": union_length(clip(lambda s: s.cat == "a2a" and s.phase == "fwd")),
        "a2a_bwd": union_length(clip(lambda s: s.cat == "a2a" and s.phase == "bwd")),
        "a2a_exposed": a2a_total - busy_in_a2a,
        "compute_busy_in_a2a": busy_in_a2a,
        "allreduce_in_flight": union_length(clip(lambda s: s.cat == "allreduce")),
        "allreduce_exposed": union_length(waits),
        "expert_compute": union_length(experts),
        "partition": sum(s.dur_s for s in mine if s.kind == schema.PARTITION),
        "idle": max(0.0, step - union_length(passes + waits)),
        "a2a_bytes": float(sum(s.bytes or 0 for s in mine if s.cat == "a2a")),
    }


def breakdown_table(spans: list[Span]) -> dict[str, dict[str, float]]:
    """Median over steps (all ranks) of each breakdown entry, per policy."""
    steps = [s for s in spans if s.cat == "step"]
    per_policy: dict[str, list[dict[str, float]]] = {}
    for st in steps:
        per_policy.setdefault(str(st.args.get("policy", "run")), []).append(step_breakdown(spans, st))
    return {pol: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for pol, rows in per_policy.items()}


def plot_step(spans: list[Span], path: Path, step: int | None = None) -> None:
    plt = pyplot(path)
    if plt is None:
        return

    steps = sorted((s for s in spans if s.cat == "step"), key=lambda s: s.start_s)
    if not steps:
        return
    chosen = step if step is not None else steps[len(steps) // 2].args.get("step")
    ranks = sorted({s.rank for s in spans})
    colors = {"compute": "#4C72B0", "a2a": "#DD8452", "allreduce": "#55A868", "sched": "#C44E52"}
    fig, ax = plt.subplots(figsize=(12, 1 + 0.9 * len(ranks)))
    t0 = min(s.start_s for s in steps if s.args.get("step") == chosen)
    for i, rank in enumerate(ranks):
        st = [s for s in steps if s.rank == rank and s.args.get("step") == chosen]
        if not st:
            continue
        start, end = st[0].start_s, st[0].end_s
        lanes = {"compute": 0.55, "a2a": 0.3, "allreduce": 0.05, "sched": 0.05}
        for s in spans:
            if s.rank != rank or s.cat not in colors or s.end_s < start or s.start_s > end:
                continue
            expert_fwd = _is_expert_compute(s) and s.phase == "fwd"
            if s.cat == "compute" and not expert_fwd and not _is_pass(s):
                continue
            if s.cat == "sched" and s.kind != schema.SYNC_WAIT:  # scheduler bookkeeping is not drawn
                continue
            y = i + lanes[s.cat]
            h = 0.2 if s.cat != "compute" or expert_fwd else 0.35
            if expert_fwd:
                y, h = i + 0.55, 0.35
            ax.broken_barh(
                [((s.start_s - t0) * 1e3, (s.end_s - s.start_s) * 1e3)],
                (y, h),
                color=colors[s.cat],
                alpha=0.6 if _is_pass(s) else 1.0,
            )
    ax.set_yticks([i + 0.5 for i in range(len(ranks))], [f"rank {r}" for r in ranks])
    ax.set_xlabel("ms since step start")
    ax.set_title(f"step {chosen}: compute (blue), all-to-all (orange), allreduce (green), waiting for allreduce (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_trace_report(folder: Path) -> dict:
    """Write ``trace.json`` (Chrome/Perfetto), ``breakdown.json`` and ``timeline.png``; print the table."""
    spans = load_run_spans(folder)
    write_chrome_trace(spans, folder / "trace.json")
    table = breakdown_table(spans)
    (folder / "breakdown.json").write_text(json.dumps(table, indent=2))
    plot_step(spans, folder / "timeline.png")
    print(f"\ntimeline breakdown (median per step, ms) -> {folder}/trace.json (open in Perfetto), timeline.png")
    cols = [
        "step",
        "compute",
        "a2a_total",
        "a2a_exposed",
        "allreduce_in_flight",
        "allreduce_exposed",
        "idle",
    ]  # of step_breakdown
    print("  " + "policy".ljust(12) + "".join(c.rjust(20) for c in cols))
    for pol, row in table.items():
        print("  " + pol.ljust(12) + "".join(f"{row[c] * 1e3:20.1f}" for c in cols))
    return table

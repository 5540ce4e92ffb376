"""Calibration rows per configuration: runs of one configuration and policy pooled.

A configuration measured more than once (the same layout, model and policy, run again later)
has one measured median per run, and those medians differ by more than the noise inside one run
where ranks compete for the machine's cores. Pooling every measured step of its runs gives the
configuration's measured median; its prediction is the median of its runs' predictions (runs may
differ in what the benchmark chose, such as the chunk size).
"""

from __future__ import annotations

import statistics


def step_times(spans_by_rank: dict) -> list[float]:
    """Durations (s) of the measured steps of a run: rank 0's ``step`` spans, as the benchmark
    times a step (its summary's median is the median of these)."""
    return [s.dur_s for s in spans_by_rank.get(0, []) if s.cat == "step"]


def pooled_rows(rows: list[dict], steps: list[list[float]]) -> list[dict]:
    """One row per configuration and policy.

    Args:
        rows: per-run calibration rows (``config`` names the configuration, with ``policy``,
            ``measured_s`` and ``predicted_s``).
        steps: for each row, the durations of its run's measured steps.

    Returns:
        Rows in first-seen order with ``config``, ``policy``, ``runs`` (how many),
        ``run_medians_s`` (each run's measured median), ``measured_s`` (median of all their
        steps; a run without step spans adds its median instead), ``predicted_s`` and ``error``.
    """
    if len(rows) != len(steps):
        raise ValueError(f"{len(rows)} rows but {len(steps)} step lists")
    groups: dict[tuple[str, str], list[tuple[dict, list[float]]]] = {}
    for row, times in zip(rows, steps):
        groups.setdefault((row["config"], row["policy"]), []).append((row, times))
    out = []
    for (config, policy), members in groups.items():
        pooled = [t for row, times in members for t in (times or [row["measured_s"]])]
        measured = statistics.median(pooled)
        predicted = statistics.median(row["predicted_s"] for row, _ in members)
        out.append(
            {
                "config": config,
                "policy": policy,
                "runs": len(members),
                "run_medians_s": [row["measured_s"] for row, _ in members],
                "measured_s": measured,
                "predicted_s": predicted,
                "error": (predicted - measured) / measured,
            }
        )
    return out

"""Small statistics shared by the benchmarks."""

from __future__ import annotations

import statistics


def summary(values: list[float]) -> dict[str, float]:
    """Median, p95, min, max of a sample (seconds or any unit)."""
    xs = sorted(values)
    if not xs:
        return {"median": float("nan"), "p95": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(xs), "p95": percentile(xs, 95), "min": xs[0], "max": xs[-1], "n": len(xs)}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

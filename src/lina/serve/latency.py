"""Per-token latency percentiles of a serving run (nearest rank), shared by the measured summary
and the device-time one."""

from __future__ import annotations


def nearest_rank(values: list[float], q: float) -> float | None:
    """The value at quantile ``q`` in [0, 1] of ``values`` (nearest rank), None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def latency_percentiles(values: list[float]) -> dict[str, float | None]:
    """``{"p50", "p95", "p99"}`` of per-token latencies in seconds."""
    return {"p50": nearest_rank(values, 0.5), "p95": nearest_rank(values, 0.95), "p99": nearest_rank(values, 0.99)}

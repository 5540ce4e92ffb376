"""Weighted max-min fair rates by progressive filling.

A *flow class* stands for ``count`` identical member flows on a resource (a whole collective's
flows that the symmetry of the cluster makes equal, or a single flow with count 1). Every
member flow of class ``f`` gets the same rate; that rate grows as ``weights[f] * t`` until a
resource it crosses saturates, then it is frozen. This is the classic water-filling
algorithm; with all weights 1 and counts 1 it is plain max-min fairness among flows.
"""

from __future__ import annotations

import numpy as np


def max_min_rates(usage: np.ndarray, capacity: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Rates of one member flow of each class under weighted max-min fairness.

    Args:
        usage: ``[F, R]`` float, member flows of class ``f`` crossing resource ``r`` (0 if none).
        capacity: ``[R]`` bytes/s of each resource.
        weights: ``[F]`` positive weight of one member flow of each class.

    Returns:
        ``[F]`` bytes/s per member flow. A class that crosses no resource gets ``inf``.
    """
    n_flows = usage.shape[0]
    rate = np.zeros(n_flows)
    if n_flows == 0:
        return rate
    remaining = capacity.astype(float).copy()
    touches = usage > 0
    active = touches.any(axis=1)
    rate[~active] = np.inf
    while active.any():
        w = np.where(active, weights, 0.0)
        load = w @ usage
        with np.errstate(divide="ignore", invalid="ignore"):
            fill = np.where(load > 0, remaining / load, np.inf)
        step = fill.min()
        rate += w * step
        remaining -= load * step
        saturated = (load > 0) & (fill <= step * (1 + 1e-12))
        remaining[saturated] = 0.0
        active &= ~touches[:, saturated].any(axis=1)
    return rate

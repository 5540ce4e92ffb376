"""Fit the network side of a calibration: allreduce latency and link efficiency, all-to-all limits.

Both fits take uncontended collectives timed across ranks (last arrival to last exit) and are
least squares on seconds, so they match the mean duration, which is what a step adds up.

- :func:`fit_allreduce`: ``duration = launch + steps * hop + x / efficiency``: ``steps`` the
  ring's ``2 (M - 1)`` steps and ``x`` the seconds the busiest link's bytes take at line rate,
  from allreduces with no compute beside them, then how much slower the bytes move beside
  compute (compute takes the cores the collective's threads need). The ring's messages are
  small, so its TCP connections keep the link busy: the efficiency found here is the link's.
- :func:`fit_a2a`: ``duration = latency + max(x / (efficiency * (1 - loss * (n - 1))),
  sent / (core * share), flow / flow_cap)``: all-to-all bytes are also bounded by what a rank's
  share of a core moves (``core`` bytes/s per whole core, counting the bytes it sends through
  the shaped links, or every byte when no loopback rate is fitted) and by what one connection to
  one peer on another host moves (``flow_cap``): a megabyte burst through the emulated cluster's
  shaped link does not reach its rate; ``n`` flows of one all-to-all between the same two hosts
  lose ``loss`` of the link's goodput per extra flow (TCP connections in one shaped queue).
- :func:`fit_loopback`: all-to-alls that stay inside hosts: ``duration = latency + bytes /
  (rate * share)``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

RATES = np.concatenate([np.geomspace(1e5, 1e10, 161), [np.inf]])  # bytes/s grid of the all-to-all limits
LOSSES = np.linspace(0.0, 0.3, 31)  # grid of the goodput lost per extra flow between two hosts


def fit_allreduce(samples: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float, float, float]:
    """(launch s, hop s, efficiency, slowdown in compute) of allreduce ``samples``.

    ``samples`` ``[N, 3]`` (ring steps, line seconds, duration) or ``[N, 4]`` with the seconds
    of it the ranks computed beside it. Allreduces with no compute beside them give ``launch +
    steps * hop + x / efficiency`` (weighted least squares, ``weights`` ``[N]``, default equal;
    non-negative launch and hop, efficiency at most 1, the best feasible fit over which bounds
    bind; with one ring size only hop is 0, with one size only efficiency is 1). Beside compute
    an allreduce moves its bytes at ``1 - slowdown`` of its speed (collectives and compute share
    the cores); the compute is taken to overlap its start, latency first, so it takes
    ``slowdown * max(0, computed - latency)`` longer: the slowdown is the least-squares ratio of
    those excesses, kept in [0, 0.9] (0 with no compute beside any sample).
    """
    w = np.ones(len(samples)) if weights is None else np.asarray(weights, dtype=float)
    busy = samples[:, 3] if samples.shape[1] > 3 else np.zeros(len(samples))
    quiet = busy <= 1e-9
    base = quiet if quiet.any() else np.ones(len(samples), dtype=bool)
    _, coef = _fit_allreduce_at(samples[base, :3], w[base])
    launch, hop, inverse = coef
    steps, x, dur = samples[:, 0], samples[:, 1], samples[:, 2]
    latency = launch + steps * hop
    excess = dur - latency - x * inverse
    overlap = np.maximum(0.0, busy - latency)
    slowdown = 0.0
    if (w * overlap * overlap).sum() > 0:
        slowdown = float(np.clip((w * excess * overlap).sum() / (w * overlap * overlap).sum(), 0.0, 0.9))
    return float(launch), float(hop), float(1.0 / inverse), slowdown


def _fit_allreduce_at(samples: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray]:
    """(weighted squared error, [launch, hop, 1 / efficiency]) of ``samples`` (see :func:`fit_allreduce`)."""
    root = np.sqrt(weights)
    steps, x, dur = samples[:, 0], samples[:, 1], samples[:, 2]
    columns = [root, steps * root, x * root]
    dur = dur * root
    free_hop = len(np.unique(steps)) > 1
    free_rate = len(np.unique(x)) > 1  # one size only: the rate cannot be told from the latency
    best = (np.inf, None)
    # bounds: launch >= 0, hop >= 0, 1 / efficiency >= 1; try every set of them held at the bound
    for held in itertools.product((False, True), repeat=3):
        if (not free_hop and not held[1]) or (not free_rate and not held[2]):
            continue
        fixed = np.array([0.0, 0.0, 1.0]) * np.array(held)
        free = [i for i in range(3) if not held[i]]
        rest = dur - sum(columns[i] * fixed[i] for i in range(3) if held[i])
        coef = fixed.copy()
        if free:
            a = np.stack([columns[i] for i in free], axis=1)
            sol, *_ = np.linalg.lstsq(a, rest, rcond=None)
            coef[free] = sol
        if coef[0] < 0 or coef[1] < 0 or coef[2] < 1:
            continue
        err = float(np.sum((np.stack(columns, axis=1) @ coef - dur) ** 2))
        if err < best[0] - 1e-18:
            best = (err, coef)
    return best


def a2a_seconds(
    samples: np.ndarray, latency: float, efficiency: float, core: np.ndarray, flow: np.ndarray, loss: float = 0.0
) -> np.ndarray:
    """Modelled durations, ``[len(core), len(flow), N]``, of ``samples`` (see :func:`fit_a2a`)."""
    x, sent, flow_bytes, share = samples[:, 0], samples[:, 1], samples[:, 2], samples[:, 3]
    pair_flows = samples[:, 5] if samples.shape[1] > 5 else np.ones(len(samples))
    goodput = efficiency * np.maximum(0.1, 1.0 - loss * (pair_flows - 1))
    with np.errstate(divide="ignore"):
        by_core = sent[None, :] / (core[:, None] * share[None, :])  # [C, N]
        by_flow = flow_bytes[None, :] / flow[:, None]  # [F, N]
    bound = np.maximum(by_core[:, None, :], by_flow[None, :, :])
    return latency + np.maximum(bound, (x / goodput)[None, None, :])


def fit_a2a(
    samples: np.ndarray, small: list[float], efficiency: float
) -> tuple[float, float | None, float | None, float, str]:
    """(latency s, per-core rate, per-flow cap, goodput loss per extra flow, note) of all-to-alls
    on links of ``efficiency``.

    ``samples`` ``[N, 5]`` or ``[N, 6]``: (busiest host link's bytes in seconds at line rate,
    bytes the mean rank sends that count against the per-core rate, bytes of its largest flow to
    another host, cores per rank, duration[, flows of the operation between two hosts]). The
    latency is the mean duration of all-to-alls under 1 KiB (counts) when there are any, else
    searched. Rates and loss are a grid search; among ties the fastest rates and the least loss
    win (a limit is fitted only where the data ask for one); ``None`` for no limit. The loss is
    searched only when some sample has more than one flow between two hosts.
    """
    dur = samples[:, 4]
    losses = LOSSES if samples.shape[1] > 5 and (samples[:, 5] > 1).any() else LOSSES[:1]

    def search(latency: float) -> tuple[float, float, float, float]:
        best = None
        for loss in losses:
            err = np.stack(
                [
                    np.mean(
                        (a2a_seconds(samples, latency, efficiency, RATES[i : i + 1], RATES, loss)[0] - dur) ** 2, axis=1
                    )
                    for i in range(len(RATES))
                ]
            )  # [C, F], one core rate at a time to bound memory
            tied = np.argwhere(err <= err.min() * (1 + 1e-9) + 1e-18)
            i, j = max(tied.tolist(), key=lambda ij: (ij[0], ij[1]))
            if best is None or err[i, j] < best[0] * (1 - 1e-9) - 1e-18:
                best = (float(err[i, j]), float(RATES[i]), float(RATES[j]), float(loss))
        return best

    if small:
        latency = float(np.mean(small))
    else:
        latency = min(np.linspace(0.0, float(dur.min()), 21), key=lambda lat: search(float(lat))[0])
    _, core, flow, loss = search(float(latency))
    if not small:  # the latency that makes the mean duration right for the chosen limits
        bound = a2a_seconds(samples, 0.0, efficiency, np.array([core]), np.array([flow]), loss)[0, 0]
        latency = max(0.0, float(np.mean(dur - bound)))
    note = ""
    if core <= RATES[0] or flow <= RATES[0]:
        note = "an all-to-all limit sits at the edge of its grid: all-to-all durations barely follow their bytes"
    return latency, (None if math.isinf(core) else core), (None if math.isinf(flow) else flow), loss, note


def fit_loopback(samples: np.ndarray, latency: float) -> float | None:
    """Bytes per second per whole core of all-to-alls that stay inside hosts, or ``None`` without
    samples.

    ``samples`` ``[M, 3]``: (bytes the mean rank sends, cores per rank, duration). Least squares
    on seconds of ``duration - latency = bytes / (rate * share)``.
    """
    if len(samples) == 0:
        return None
    z = samples[:, 0] / samples[:, 1]
    y = samples[:, 2] - latency
    inverse = float((y * z).sum() / (z * z).sum())
    return 1.0 / inverse if inverse > 0 else None

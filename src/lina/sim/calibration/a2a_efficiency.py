"""The links' efficiency for an all-to-all, fitted from the start-up dilation check's measurements.

The check (:mod:`lina.cluster.dilation_check`) times an all-to-all alone on the emulated links
and reports the fraction of the link rate it reached (shaping, TCP and Gloo's pairwise exchange
lose the rest: about 60% was reached at 100 and 400 Mbit/s on 4 hosts). The simulator models that
loss with :attr:`lina.sim.spec.ClusterSpec.link_efficiency` (the share of a NIC's line rate a
transfer reaches); :func:`fit_a2a_link_efficiency` finds the value that reproduces the measured
durations, and :func:`emulated_cluster_spec` builds the simulator's cluster of an emulated one with
it. No term here describes the CPU: the check keeps only link-bound measurements.
"""

from __future__ import annotations

from lina.sim.spec import ClusterSpec


def link_bound(check: dict) -> list[dict]:
    """The measurements of a check (``DilationCheck.to_dict()``) where the link set the pace: those
    at or above the smallest passing dilation (all of them when none passed: then the fit describes
    a CPU-bound all-to-all, which the caller should not use for a GPU cluster)."""
    passing = check.get("smallest_passing")
    rows = check["measurements"]
    return [m for m in rows if passing is None or m["dilation"] >= passing]


def fit_a2a_link_efficiency(measurements: list[dict]) -> float:
    """Least squares on seconds of ``seconds = ideal_s / efficiency`` over ``measurements``
    (dicts with ``ideal_s`` and ``seconds``), so the fit matches the durations; at most 1."""
    if not measurements:
        raise ValueError("no measurements to fit the link efficiency from")
    num = sum(m["ideal_s"] ** 2 for m in measurements)
    den = sum(m["ideal_s"] * m["seconds"] for m in measurements)
    return min(1.0, num / den)


def emulated_cluster_spec(
    hosts: int, workers_per_host: int, link_bps: float, efficiency: float, intra_bps: float = 0.0
) -> ClusterSpec:
    """The simulator's view of an emulated cluster: ``hosts`` x ``workers_per_host`` devices, each
    host's link at ``link_bps`` (emulated rate) reaching ``efficiency`` of it; the intra-host link
    at ``intra_bps`` (0: the simulator's NVLink default)."""
    extra = {"nvlink_gbps": intra_bps / 1e9} if intra_bps else {}
    return ClusterSpec(
        hosts=hosts,
        gpus_per_host=workers_per_host,
        link_gbps=link_bps / 1e9,
        link_efficiency=efficiency,
        **extra,
    )

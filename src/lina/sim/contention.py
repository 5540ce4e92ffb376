"""The contention scenario of ``lina bench contention``, simulated: an all-to-all alone, and again
beside a ring allreduce on the same links (the allreduce starts first and outlasts it).

On the emulated links (:mod:`lina.cluster.shaping`, share ``peer``: an htb class per peer host,
flows to one peer in that class's FIFO) TCP connections share a link about per connection, and
Gloo runs each all-to-all flow (one rank to one peer) and each ring step on one connection of its
own process group. :func:`compare` simulates a measured run's scenario under both of the
simulator's link-sharing modes (``ClusterSpec.fairness``): ``"collective"`` (each collective an
equal share of a NIC) and ``"flow"`` (each connection an equal share), beside the measured median
slowdown. The link efficiency is the one that makes the simulated all-to-all alone last the
measured median; it scales both collectives alike, so the slowdown does not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lina.sim import collectives
from lina.sim.spec import FAIRNESS_MODES, ClusterSpec
from lina.sim.topology import Topology


@dataclass(frozen=True)
class ContentionResult:
    """Simulated seconds of the all-to-all alone and beside the allreduce, and their ratio."""

    fairness: str
    alone_s: float
    contended_s: float

    @property
    def slowdown(self) -> float:
        return self.contended_s / self.alone_s


def simulate_contention(cluster: ClusterSpec, a2a_bytes_per_rank: float, allreduce_bytes: float) -> ContentionResult:
    """The all-to-all (``a2a_bytes_per_rank`` sent by each rank, all ranks) alone and beside a
    ring allreduce of ``allreduce_bytes`` over all ranks started at the same moment."""
    topo = Topology(cluster, representative=True)
    n = cluster.gpus

    def a2a_end(with_allreduce: bool) -> float:
        net = topo.network()
        if with_allreduce:
            net.start(collectives.ring_allreduce(topo, 1, n, allreduce_bytes), kind="allreduce")
        tid = net.start(collectives.all_to_all(topo, n, a2a_bytes_per_rank), kind="a2a")
        while True:
            t = net.next_event_time()
            if tid in net.advance_to(t):
                return t

    return ContentionResult(cluster.fairness, a2a_end(False), a2a_end(True))


def measured_cluster(measured: dict, fairness: str) -> ClusterSpec:
    """The emulated cluster of a ``lina bench contention`` JSON, its link efficiency the one that
    makes the all-to-all alone last the measured median (no latencies: they are inside it)."""
    efficiency = min(1.0, measured["a2a_link_bound_s"] / measured["alone_s"]["median"])
    return ClusterSpec(
        hosts=measured["hosts"],
        gpus_per_host=measured["workers_per_host"],
        link_gbps=measured["link_bps"] / 1e9,
        link_efficiency=efficiency,
        launch_s=0.0,
        per_peer_s=0.0,
        hop_latency_s=0.0,
        fairness=fairness,
    )


def compare(measured: dict) -> dict:
    """Measured median slowdown of a ``lina bench contention`` JSON beside the simulated one under
    each link-sharing mode (``error``: simulated / measured - 1)."""
    target = measured["slowdown"]["median"]
    out = {
        "measured": {
            "slowdown_median": target,
            "alone_median_s": measured["alone_s"]["median"],
            "contended_median_s": measured["contended_s"]["median"],
            "share": measured.get("share", "peer"),
            "setting": f"{measured['hosts']} hosts x {measured['workers_per_host']}, link {measured['link']}, "
            f"a2a {measured['a2a_bytes_per_rank']} B/rank, allreduce {measured['allreduce_bytes']} B",
        },
        "simulated": {},
    }
    for fairness in FAIRNESS_MODES:
        cluster = measured_cluster(measured, fairness)
        res = simulate_contention(cluster, measured["a2a_bytes_per_rank"], measured["allreduce_bytes"])
        out["simulated"][fairness] = {
            "alone_s": res.alone_s,
            "contended_s": res.contended_s,
            "slowdown": res.slowdown,
            "error": res.slowdown / target - 1,
            "link_efficiency": cluster.link_efficiency,
        }
    return out


def report_lines(result: dict) -> list[str]:
    """``compare``'s result as text."""
    m = result["measured"]
    lines = [
        f"contention: {m['setting']}, link sharing {m['share']}",
        f"  measured: all-to-all {m['alone_median_s'] * 1e3:.1f} ms alone, {m['contended_median_s'] * 1e3:.1f} ms "
        f"beside the allreduce (medians); median slowdown {m['slowdown_median']:.2f}x",
    ]
    for fairness, s in result["simulated"].items():
        lines.append(
            f"  simulated, fairness {fairness:10s}: {s['alone_s'] * 1e3:.1f} ms alone, {s['contended_s'] * 1e3:.1f} ms "
            f"contended, slowdown {s['slowdown']:.2f}x ({s['error']:+.0%} vs measured)"
        )
    return lines

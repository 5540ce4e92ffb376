"""Collectives decomposed into flows: ring allreduce, pairwise and hierarchical all-to-all.

Groups are contiguous blocks of ranks (expert-parallel groups) or strided sets (the replicas
of an expert, or the whole world for data-parallel gradients). Functions return a
:class:`~lina.sim.network.Transfer` whose flows are those sent by ``topo.sources()``.

Latency model: a collective costs ``launch_s`` before its first byte moves; an all-to-all phase
adds ``per_peer_s`` per peer a GPU sends to; each ring step costs ``hop_latency_s``.
Fairness weight (``ClusterSpec.fairness == "collective"``): every member flow of a phase gets
weight ``1 / (members on the busiest NIC port)``, so one collective weighs 1 on a NIC whatever
its number of flows; ``"flow"`` gives every flow weight 1.
"""

from __future__ import annotations

import numpy as np

from lina.sim.network import Phase, Transfer
from lina.sim.topology import FlowClass, Topology


def _phase(topo: Topology, classes: list[FlowClass], latency_s: float) -> Phase:
    weight = 1.0
    if topo.cluster.fairness == "collective" and classes:
        weight = 1.0 / max(topo.nic_load(classes), 1.0)
    return Phase(tuple(classes), latency_s, weight)


def _group_members(sources: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All (src, dst) pairs, ``dst`` in the contiguous group of ``src``: two ``[S * group_size]`` arrays."""
    start = (sources // group_size) * group_size
    src = np.repeat(sources, group_size)
    dst = (start[:, None] + np.arange(group_size)[None, :]).reshape(-1)
    return src, dst


def all_to_all(topo: Topology, group_size: int, bytes_per_rank: float, algorithm: str = "pairwise", name: str = "a2a") -> Transfer:
    """Uniform all-to-all in contiguous groups of ``group_size`` ranks.

    Each rank sends ``bytes_per_rank`` in total, ``bytes_per_rank / group_size`` to every group
    member (its own share stays local).

    ``pairwise``: one phase, every pair at once. ``hierarchical`` (groups spanning hosts): phase 1
    inside each host (to the GPU of the destination's local index, ``bytes / G`` per peer),
    phase 2 between hosts among GPUs of one local index (``bytes / hosts_in_group`` per peer).
    """
    c = topo.cluster
    g = c.gpus_per_host
    sources = topo.sources()
    if group_size <= 1 or bytes_per_rank <= 0:
        return Transfer(name, (Phase((), c.launch_s),), bytes_per_rank)
    if algorithm == "hierarchical" and group_size > g:
        hosts_in_group = group_size // g
        # phase 1: inside the host, to every local GPU
        src1 = np.repeat(sources, g)
        dst1 = ((sources // g) * g)[:, None] + np.arange(g)[None, :]
        p1 = topo.classes(src1, dst1.reshape(-1), bytes_per_rank / g)
        # phase 2: across the group's hosts, same local index
        group_start_host = (sources // group_size) * hosts_in_group
        src2 = np.repeat(sources, hosts_in_group)
        dst2 = (group_start_host[:, None] + np.arange(hosts_in_group)[None, :]) * g + (sources % g)[:, None]
        p2 = topo.classes(src2, dst2.reshape(-1), bytes_per_rank / hosts_in_group)
        phases = (
            _phase(topo, p1, c.launch_s + c.per_peer_s * (g - 1)),
            _phase(topo, p2, c.per_peer_s * (hosts_in_group - 1)),
        )
        return Transfer(name, phases, bytes_per_rank)
    src, dst = _group_members(sources, group_size)
    classes = topo.classes(src, dst, bytes_per_rank / group_size)
    return Transfer(name, (_phase(topo, classes, c.launch_s + c.per_peer_s * (group_size - 1)),), bytes_per_rank)


def all_to_all_matrix(topo: Topology, traffic: np.ndarray, name: str = "a2a") -> Transfer:
    """All-to-all with an arbitrary traffic matrix (full topology only).

    Args:
        traffic: ``[N, N]`` bytes rank ``i`` sends to rank ``j``.
    """
    if topo.representative:
        raise ValueError("an uneven all-to-all needs the full topology (representative=False)")
    c = topo.cluster
    n = traffic.shape[0]
    src, dst = np.nonzero(traffic)
    classes = topo.classes(src, dst, traffic[src, dst])
    peers = int(((traffic > 0) & ~np.eye(n, dtype=bool)).sum(axis=1).max()) if n > 1 else 0
    return Transfer(name, (_phase(topo, classes, c.launch_s + c.per_peer_s * peers),), float(traffic.sum(axis=1).max()))


def ring_allreduce(
    topo: Topology, stride: int, ring_size: int, nbytes: float, stepwise: bool = False, name: str = "allreduce"
) -> Transfer:
    """Ring allreduce of ``nbytes`` in every ring ``{i, i + stride, i + 2 * stride, ...}``.

    ``stride=1, ring_size=N`` is one ring over the world; ``stride=ep`` the replicas of each
    expert. A ring of ``M`` ranks runs ``2 (M - 1)`` steps (reduce-scatter then all-gather), in
    each step every rank sends ``nbytes / M`` to its successor.

    ``stepwise``: one phase per step with a barrier between steps (exact, slow for big rings).
    Otherwise one phase of ``2 (M - 1) / M * nbytes`` per link: the fluid limit of the same
    steps (every link carries the same bytes in every step, so only the slowest link's rate
    matters), with the steps' latency added up front.
    """
    c = topo.cluster
    if ring_size <= 1 or nbytes <= 0:
        return Transfer(name, (Phase((), 0.0),), 0.0)
    sources = topo.sources()
    span = stride * ring_size
    pos = (sources % span) // stride
    nxt = (sources - pos * stride) + ((pos + 1) % ring_size) * stride
    steps = 2 * (ring_size - 1)
    if stepwise:
        classes = topo.classes(sources, nxt, nbytes / ring_size)
        phases = [_phase(topo, classes, c.launch_s + c.hop_latency_s)]
        phases += [_phase(topo, classes, c.hop_latency_s) for _ in range(steps - 1)]
        return Transfer(name, tuple(phases), nbytes)
    classes = topo.classes(sources, nxt, steps / ring_size * nbytes)
    return Transfer(name, (_phase(topo, classes, c.launch_s + steps * c.hop_latency_s),), nbytes)


def ring_allreduce_time(nbytes: float, ring_size: int, bandwidth: float, hop_latency_s: float = 0.0, launch_s: float = 0.0) -> float:
    """Closed form of an uncontended ring allreduce: ``launch + 2(M-1) (hop + S / (M B))``."""
    if ring_size <= 1:
        return 0.0
    steps = 2 * (ring_size - 1)
    return launch_s + steps * (hop_latency_s + nbytes / ring_size / bandwidth)

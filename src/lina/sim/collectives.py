"""Collectives decomposed into flows: ring allreduce, pairwise and hierarchical all-to-all.

Groups are contiguous blocks of ranks (expert-parallel groups) or strided sets (the replicas
of an expert, or the whole world for data-parallel gradients). Functions return a
:class:`~lina.sim.network.Transfer` whose flows are those sent by ``topo.sources()``.

Latency model: a collective costs ``launch_s`` before its first byte moves (an allreduce
``ClusterSpec.allreduce_start_s``); an all-to-all phase
adds ``per_peer_s`` per peer a GPU sends to; each ring step costs ``hop_latency_s``.
Fairness weight (``ClusterSpec.fairness == "collective"``): every member flow of a phase gets
weight ``1 / (members on the busiest NIC port)``, so one collective weighs 1 on a NIC whatever
its number of flows; ``"flow"`` gives every flow (a rank to one peer) the weight of the transport
connections it runs on (``ClusterSpec.a2a_connections`` / ``allreduce_connections``), each
connection a fair share of the link, as TCP connections in one queue share it.
"""

from __future__ import annotations

import numpy as np

from lina.sim.network import Phase, Transfer, make_phase
from lina.sim.topology import FlowClass, Topology

ALLREDUCE_ALGORITHMS = ("ring", "hierarchical")


def _phase(topo: Topology, classes: list[FlowClass], latency_s: float, connections: int = 1) -> Phase:
    """A phase of ``classes``; ``connections``: transport connections per member flow (``"flow"`` fairness)."""
    weight = float(connections)
    if topo.cluster.fairness == "collective" and classes:
        weight = 1.0 / max(topo.nic_load(classes), 1.0)
    return make_phase(classes, latency_s, topo.n_resources, weight)


def _empty(topo: Topology, name: str, latency_s: float, nbytes: float) -> Transfer:
    return Transfer(name, (make_phase((), latency_s, topo.n_resources),), nbytes)


def _group_members(sources: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All (src, dst) pairs, ``dst`` in the contiguous group of ``src``: two ``[S * group_size]`` arrays."""
    start = (sources // group_size) * group_size
    src = np.repeat(sources, group_size)
    dst = (start[:, None] + np.arange(group_size)[None, :]).reshape(-1)
    return src, dst


def all_to_all(
    topo: Topology, group_size: int, bytes_per_rank: float, algorithm: str = "pairwise", name: str = "a2a"
) -> Transfer:
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
        return _empty(topo, name, c.launch_s, bytes_per_rank)
    if algorithm == "hierarchical" and group_size > g:
        hosts_in_group = group_size // g
        src1 = np.repeat(sources, g)
        dst1 = ((sources // g) * g)[:, None] + np.arange(g)[None, :]
        p1 = topo.classes(src1, dst1.reshape(-1), bytes_per_rank / g, copy=True)
        group_start_host = (sources // group_size) * hosts_in_group
        src2 = np.repeat(sources, hosts_in_group)
        dst2 = (group_start_host[:, None] + np.arange(hosts_in_group)[None, :]) * g + (sources % g)[:, None]
        p2 = topo.classes(src2, dst2.reshape(-1), bytes_per_rank / hosts_in_group, copy=True)
        phases = (
            _phase(topo, p1, c.launch_s + c.per_peer_s * (g - 1), c.a2a_connections),
            _phase(topo, p2, c.per_peer_s * (hosts_in_group - 1), c.a2a_connections),
        )
        return Transfer(name, phases, bytes_per_rank)
    src, dst = _group_members(sources, group_size)
    classes = topo.classes(src, dst, bytes_per_rank / group_size, copy=True)
    return Transfer(
        name, (_phase(topo, classes, c.launch_s + c.per_peer_s * (group_size - 1), c.a2a_connections),), bytes_per_rank
    )


def all_to_all_matrix(topo: Topology, traffic: np.ndarray, name: str = "a2a") -> Transfer:
    """All-to-all with an arbitrary traffic matrix (full topology only).

    Args:
        traffic: ``[N, N]`` bytes rank ``i`` sends to rank ``j``.
    """
    if topo.representative:
        raise ValueError("an uneven all-to-all needs the full topology (representative=False)")
    c = topo.cluster
    n = traffic.shape[0]
    off_diag = traffic * (1 - np.eye(n))
    src, dst = np.nonzero(off_diag)
    classes = topo.classes(src, dst, off_diag[src, dst], copy=True)
    peers = int((off_diag > 0).sum(axis=1).max()) if n > 1 else 0
    return Transfer(
        name,
        (_phase(topo, classes, c.launch_s + c.per_peer_s * peers, c.a2a_connections),),
        float(traffic.sum(axis=1).max()),
    )


def ring_successors(
    sources: np.ndarray, stride: int, ring_size: int, gpus_per_host: int, channel: int, channels: int
) -> np.ndarray:
    """Next rank of each source in ring ``channel`` of its group ``{i, i + stride, ...}``.

    Members of a group that share a host are visited consecutively; channel ``c`` rotates the
    order inside every host by ``c * per_host // channels`` so that different channels leave
    a host from different GPUs (hence different NICs), as NCCL's rings do.

    Returns:
        ``[S]`` int ranks.
    """
    span = stride * ring_size
    per_host = max(1, gpus_per_host // stride) if stride < gpus_per_host else 1
    per_host = min(per_host, ring_size)
    blocks = ring_size // per_host
    pos = (sources % span) // stride  # position in the group, 0..ring_size-1
    base = sources - pos * stride  # the group's first member
    block, j = np.divmod(pos, per_host)
    rot = channel * per_host // channels
    q = (j - rot) % per_host  # place in this channel's order inside the host
    last = q == per_host - 1
    next_pos = np.where(last, ((block + 1) % blocks) * per_host + rot % per_host, block * per_host + (j + 1) % per_host)
    return base + next_pos * stride


def ring_allreduce(
    topo: Topology,
    stride: int,
    ring_size: int,
    nbytes: float,
    stepwise: bool = False,
    channels: int | None = None,
    name: str = "allreduce",
) -> Transfer:
    """Ring allreduce of ``nbytes`` in every group ``{i, i + stride, i + 2 * stride, ...}``.

    ``stride=1, ring_size=N`` is the whole world; ``stride=ep`` the replicas of each expert.
    A ring of ``M`` ranks runs ``2 (M - 1)`` steps (reduce-scatter then all-gather); in each
    step every rank sends ``nbytes / M`` to its successor. The bytes are split over
    ``channels`` rings (default: one per NIC of a host) leaving hosts through different NICs.

    ``stepwise``: one phase per step with a barrier between steps (exact, slow for big rings).
    Otherwise one phase of ``2 (M - 1) / M * nbytes`` per link: the fluid limit of the same
    steps (every link carries the same bytes in every step, so only the slowest link's rate
    matters), with the steps' latency added up front.
    """
    c = topo.cluster
    if ring_size <= 1 or nbytes <= 0:
        return _empty(topo, name, 0.0, 0.0)
    channels = channels or c.nics_per_host
    sources = topo.sources()
    srcs = np.concatenate([sources] * channels)
    dsts = np.concatenate(
        [ring_successors(sources, stride, ring_size, c.gpus_per_host, ch, channels) for ch in range(channels)]
    )
    steps = 2 * (ring_size - 1)
    if stepwise:
        classes = topo.classes(srcs, dsts, nbytes / ring_size / channels)
        phases = [_phase(topo, classes, c.allreduce_start_s + c.hop_latency_s, c.allreduce_connections)]
        phases += [_phase(topo, classes, c.hop_latency_s, c.allreduce_connections) for _ in range(steps - 1)]
        return Transfer(name, tuple(phases), nbytes)
    classes = topo.classes(srcs, dsts, steps / ring_size * nbytes / channels)
    return Transfer(
        name, (_phase(topo, classes, c.allreduce_start_s + steps * c.hop_latency_s, c.allreduce_connections),), nbytes
    )


def hierarchical_allreduce(
    topo: Topology, stride: int, ring_size: int, nbytes: float, name: str = "allreduce"
) -> Transfer:
    """Two-level allreduce: reduce-scatter inside hosts, ring across hosts, all-gather inside.

    The ``b`` group members of a host reduce-scatter over NVLink (fluid: ``(b-1)/b * S`` per
    link), the members of one local index allreduce their ``S / b`` share in a ring over the
    ``M / b`` hosts (each on its own GPU's NIC), then all-gather inside the host. Latency is
    ``2 (b - 1) + 2 (M / b - 1)`` hops instead of ``2 (M - 1)``. Falls back to the ring when the
    group has one member per host or sits in one host.
    """
    c = topo.cluster
    g = c.gpus_per_host
    per_host = min(max(1, g // stride) if stride < g else 1, ring_size)
    hosts = ring_size // per_host
    if per_host == 1 or hosts == 1 or nbytes <= 0:
        return ring_allreduce(topo, stride, ring_size, nbytes, name=name)
    sources = topo.sources()
    # intra-host ring among the host's members: successor inside the host
    span = stride * ring_size
    pos = (sources % span) // stride
    block, j = np.divmod(pos, per_host)
    base = sources - pos * stride
    intra_next = base + (block * per_host + (j + 1) % per_host) * stride
    intra = topo.classes(sources, intra_next, (per_host - 1) / per_host * nbytes)
    # inter-host ring among members of one local position, over the group's hosts
    inter_next = base + (((block + 1) % hosts) * per_host + j) * stride
    inter = topo.classes(sources, inter_next, 2 * (hosts - 1) / hosts * nbytes / per_host)
    hop = c.hop_latency_s
    phases = (
        _phase(topo, intra, c.allreduce_start_s + (per_host - 1) * hop, c.allreduce_connections),
        _phase(topo, inter, 2 * (hosts - 1) * hop, c.allreduce_connections),
        _phase(topo, intra, (per_host - 1) * hop, c.allreduce_connections),
    )
    return Transfer(name, phases, nbytes)


def allreduce(
    topo: Topology, stride: int, ring_size: int, nbytes: float, algorithm: str = "ring", name: str = "allreduce"
) -> Transfer:
    """Allreduce by ``algorithm`` (``ring`` or ``hierarchical``)."""
    if algorithm == "hierarchical":
        return hierarchical_allreduce(topo, stride, ring_size, nbytes, name)
    return ring_allreduce(topo, stride, ring_size, nbytes, name=name)


def ring_allreduce_time(
    nbytes: float, ring_size: int, bandwidth: float, hop_latency_s: float = 0.0, launch_s: float = 0.0
) -> float:
    """Closed form of an uncontended ring allreduce: ``launch + 2(M-1) (hop + S / (M B))``."""
    if ring_size <= 1:
        return 0.0
    steps = 2 * (ring_size - 1)
    return launch_s + steps * (hop_latency_s + nbytes / ring_size / bandwidth)

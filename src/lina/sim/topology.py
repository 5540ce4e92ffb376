"""Where flows go: NIC and NVLink resources of a cluster, and flows folded into classes.

Each host has, per direction, ``nics_per_host`` NIC ports and one NVLink port per GPU.
Resource layout per host (``stride = 2 * nics + 2 * gpus_per_host``)::

    [nic_out 0..n-1 | nic_in 0..n-1 | nvl_out 0..G-1 | nvl_in 0..G-1]

A flow between two GPUs of one host crosses ``nvl_out[src]`` and ``nvl_in[dst]``; between
hosts it crosses ``nic_out[nic(src)]`` and ``nic_in[nic(dst)]``. On a cluster with a CPU host model
(``ClusterSpec.host``, :class:`~lina.sim.spec.CpuHostModel`), with ``rank_copy_gbps`` every
GPU also has a *copy* resource (after all the strides) that the all-to-all flows it sends cross,
wherever they go (only those to other hosts without ``copy_intra``): the process that moves the
bytes when collectives run over TCP on CPUs. With ``flow_copy_gbps`` each all-to-all flow between
hosts is also capped on its own (a TCP connection through the emulated cluster's shaped link), and
with ``pair_flow_loss`` the flows of one all-to-all between the same two hosts cost the link more
per byte the more of them there are.

**Representative mode.** When every host sees the same traffic (uniform routing in training,
groups that are whole hosts), the max-min allocation is the same on every host: progressive
filling saturates a resource type on all hosts at once. The simulator then keeps only host 0:
flows *sent* by host 0, with a remote destination's NIC-in mapped onto host 0's NIC-in of the
same local index (which, by the same symmetry, receives exactly the mirrored flows). Flows with
the same resources and size merge into one class with a member count. A 1024-GPU all-to-all
becomes a handful of classes. ``full`` mode keeps every resource of every host and every flow,
for asymmetric traffic (inference) and to check the reduction on small clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lina.sim.spec import ClusterSpec


@dataclass(frozen=True)
class FlowClass:
    """``count`` member flows of ``size`` bytes each, crossing every resource in ``resources``.

    ``count`` is how many members cross each of those resources (the same on each); ``cap`` is
    the most one member moves per second whatever the resources leave it (``inf``: no cap).
    ``link_cost`` is what one byte takes of the first two resources (the ports the flow leaves
    and enters by: above 1 when flows sharing a host link lose goodput, see
    ``ClusterSpec.pair_flow_loss``); ``intra``: the members stay inside one host.
    """

    resources: tuple[int, ...]
    count: float
    size: float
    cap: float = float("inf")
    link_cost: float = 1.0
    intra: bool = False


class Topology:
    """Resources of a cluster (all hosts, or host 0 as representative) and flow folding.

    Args:
        cluster: the cluster.
        representative: keep host 0 only (see module docstring).
    """

    def __init__(self, cluster: ClusterSpec, representative: bool = True):
        self.cluster = cluster
        self.representative = representative
        self.gpus_per_host = cluster.gpus_per_host
        self.nics = cluster.nics_per_host
        self.stride = 2 * self.nics + 2 * self.gpus_per_host
        hosts_kept = 1 if representative else cluster.hosts
        one_host = np.concatenate(
            [
                np.full(2 * self.nics, cluster.nic_bytes_per_s),
                np.full(2 * self.gpus_per_host, cluster.nvlink_bytes_per_s),
            ]
        )
        host = cluster.host
        copy = None if host is None else host.rank_copy_bytes_per_s
        self.copy_base = hosts_kept * self.stride  # GPU a of kept host h: copy_base + h * G + a (with rank_copy_gbps)
        self.capacity = np.tile(one_host, hosts_kept)
        self.is_nic = np.tile(np.arange(self.stride) < 2 * self.nics, hosts_kept)
        if copy is not None:
            gpus_kept = hosts_kept * self.gpus_per_host
            self.capacity = np.concatenate([self.capacity, np.full(gpus_kept, copy)])
            self.is_nic = np.concatenate([self.is_nic, np.zeros(gpus_kept, dtype=bool)])

    def network(self):
        """An idle :class:`~lina.sim.network.FlowNetwork` over these resources."""
        from lina.sim.network import FlowNetwork

        return FlowNetwork(self.capacity)

    @property
    def n_resources(self) -> int:
        return self.capacity.shape[0]

    def resource_name(self, index: int) -> str:
        if index >= self.copy_base:
            host, gpu = divmod(index - self.copy_base, self.gpus_per_host)
            return f"h{host}.gpu{gpu}.copy"
        host, off = divmod(index, self.stride)
        n, g = self.nics, self.gpus_per_host
        if off < n:
            return f"h{host}.nic{off}.out"
        if off < 2 * n:
            return f"h{host}.nic{off - n}.in"
        if off < 2 * n + g:
            return f"h{host}.gpu{off - 2 * n}.nvl.out"
        return f"h{host}.gpu{off - 2 * n - g}.nvl.in"

    def sources(self) -> np.ndarray:
        """Ranks whose outgoing flows are simulated: host 0's GPUs, or every GPU."""
        count = self.gpus_per_host if self.representative else self.cluster.gpus
        return np.arange(count)

    def classes(
        self, src: np.ndarray, dst: np.ndarray, size: np.ndarray | float, copy: bool = False
    ) -> list[FlowClass]:
        """Fold point-to-point flows into classes.

        Args:
            src: ``[P]`` int sending ranks (in representative mode, ranks of host 0 only).
            dst: ``[P]`` int receiving ranks (any host).
            size: ``[P]`` or scalar, bytes of each flow.
            copy: all-to-all traffic: the flows also cross their sending GPU's copy resource
                (when the cluster's host model has ``rank_copy_gbps``; flows inside a host only
                with ``copy_intra``), each flow between hosts is capped at ``flow_copy_gbps`` when
                the host model has it, and flows between the same two hosts pay ``pair_flow_loss``.

        Returns:
            One :class:`FlowClass` per distinct (resources, size); self-sends and empty flows
            are dropped (a local copy costs no network time).
        """
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        size = np.broadcast_to(np.asarray(size, dtype=float), src.shape)
        keep = (src != dst) & (size > 0)
        src, dst, size = src[keep], dst[keep], size[keep]
        if src.size == 0:
            return []
        g, n = self.gpus_per_host, self.nics
        hs, a = np.divmod(src, g)
        hd, b = np.divmod(dst, g)
        same = hs == hd
        cost = np.ones(src.shape)
        host = self.cluster.host
        loss = 0.0 if host is None else host.pair_flow_loss
        if copy and loss > 0 and (~same).any():  # flows of this operation between each pair of hosts
            _, pair, per_pair = np.unique(np.stack([hs, hd], axis=1), axis=0, return_inverse=True, return_counts=True)
            cost = np.where(same, 1.0, 1.0 / np.maximum(0.1, 1.0 - loss * (per_pair[pair.reshape(-1)] - 1)))
        if self.representative:
            if (hs != 0).any():
                raise ValueError("representative topology takes flows sent by host 0 only")
            hs = np.zeros_like(hs)
            hd = np.zeros_like(hd)
        nic_a = a * n // g
        nic_b = b * n // g
        r_out = np.where(same, hs * self.stride + 2 * n + a, hs * self.stride + nic_a)
        r_in = np.where(same, hd * self.stride + 2 * n + g + b, hd * self.stride + n + nic_b)
        through_copy = copy and host is not None and host.rank_copy_gbps is not None
        copy_res = self.copy_base + hs * g + a if through_copy else np.full(src.shape, -1)
        if through_copy and not host.copy_intra:
            copy_res = np.where(same, -1, copy_res)
        keys = np.stack(
            [r_out.astype(float), r_in.astype(float), size, copy_res.astype(float), same.astype(float), cost], axis=1
        )
        uniq, counts = np.unique(keys, axis=0, return_counts=True)
        flow_cap = host.flow_copy_bytes_per_s if copy and host is not None else None
        out = []
        for k, members in zip(uniq, counts):
            resources = (int(k[0]), int(k[1])) + ((int(k[3]),) if k[3] >= 0 else ())
            cap = float("inf") if flow_cap is None or k[4] else flow_cap  # the cap is TCP's over a host link
            out.append(FlowClass(resources, float(members), float(k[2]), cap, float(k[5]), bool(k[4])))
        return out

    def nic_load(self, classes: list[FlowClass]) -> float:
        """Most member flows of ``classes`` on any one NIC port (or any port if none is a NIC)."""
        load = np.zeros(self.n_resources)
        for fc in classes:
            for r in fc.resources:
                load[r] += fc.count
        nic = load[self.is_nic]
        if nic.size and nic.max() > 0:
            return float(nic.max())
        return float(load.max()) if load.size else 0.0

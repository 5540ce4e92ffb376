"""Typed, validated descriptions of what the simulator simulates: cluster, model, device, training.

Every dataclass checks itself on construction and raises :class:`~lina.errors.ConfigError`
naming the field and the fix. Rates are given the way people quote them (Gbit/s, TFLOP/s,
GB/s) and converted to bytes/s and FLOP/s by properties.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from lina.devices import DEVICES, DeviceSpec  # noqa: F401  (re-exported: scenarios name devices here)
from lina.devices import require_positive as _positive
from lina.errors import ConfigError

FAIRNESS_MODES = ("collective", "flow")
A2A_ALGORITHMS = ("pairwise", "hierarchical")
ALLREDUCE_ALGORITHMS = ("ring", "hierarchical")


def _non_negative(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(name, f"must be 0 or more, got {value!r}", f"set {name} to 0 or a positive number")


def _integer(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(name, f"must be a whole number >= 1, got {value!r}", f"set {name} to 1 or more")


@dataclass(frozen=True)
class CpuHostModel:
    """What a host's CPUs impose on collectives that run on them (Gloo over TCP, the emulated
    cluster of :mod:`lina.cluster`); GPU clusters have none of it (``ClusterSpec.host`` is None).
    Fitted by ``lina sim --calibrate`` (:mod:`lina.sim.calibration.host`).

    Args:
        rank_copy_gbps: the most all-to-all traffic one rank sends per second, to peers on any
            host, whatever the links allow: each Gloo process moves every byte through TCP on
            shared cores; ``None``: no such limit.
        flow_copy_gbps: the most one all-to-all flow between hosts (one rank to one peer, in one
            operation) moves per second: a TCP connection through the shaped link does not reach
            the link rate with a burst of a megabyte or more (the ring allreduce's smaller
            messages do); ``None``: no such limit.
        copy_intra: intra-host all-to-all flows cross their rank's copy resource too (default);
            ``False`` where loopback copies inside a host are bound by ``nvlink_gbps`` alone
            (loopback moves gigabits a second where a TCP connection through the shaped link
            moves a few hundred megabits).
        pair_flow_loss: share of the host link's goodput lost per extra flow of one all-to-all
            between the same two hosts (TCP connections sharing one shaped queue); 0: none.
        a2a_in_flight: all-to-all operations one rank runs at once (Gloo serves asynchronous
            operations with two threads per process group, so pipelined micro-ops overlap).
        allreduce_launch_s: fixed cost of launching one allreduce when it differs from the other
            collectives' ``launch_s`` (``None``: the same); a calibrated emulated cluster starts an
            all-to-all slower than an allreduce.
    """

    rank_copy_gbps: float | None = None
    flow_copy_gbps: float | None = None
    copy_intra: bool = True
    pair_flow_loss: float = 0.0
    a2a_in_flight: int = 1
    allreduce_launch_s: float | None = None

    def __post_init__(self):
        for name in ("rank_copy_gbps", "flow_copy_gbps"):
            if getattr(self, name) is not None:
                _positive(self, name)
        _integer(self, "a2a_in_flight")
        if self.allreduce_launch_s is not None:
            _non_negative(self, "allreduce_launch_s")
        if not 0.0 <= self.pair_flow_loss < 1.0:
            raise ConfigError(
                "pair_flow_loss", f"{self.pair_flow_loss} is outside [0, 1)", "use a share of the link, e.g. 0.05"
            )

    @property
    def rank_copy_bytes_per_s(self) -> float | None:
        return None if self.rank_copy_gbps is None else self.rank_copy_gbps * 1e9 / 8

    @property
    def flow_copy_bytes_per_s(self) -> float | None:
        return None if self.flow_copy_gbps is None else self.flow_copy_gbps * 1e9 / 8


@dataclass(frozen=True)
class ClusterSpec:
    """Hosts of ``gpus_per_host`` GPUs; each host has ``nics_per_host`` NICs of ``link_gbps``.

    GPUs of one host talk over NVLink-like links (``nvlink_gbps`` per GPU per direction); GPUs
    of different hosts go through their NICs (GPU ``a`` of a host uses NIC
    ``a * nics_per_host // gpus_per_host``). Rates are per direction.

    Args:
        link_efficiency: fraction of the NIC line rate a transfer reaches (protocol overhead).
        launch_s: fixed cost of launching one collective.
        per_peer_s: extra start-up cost of an all-to-all per peer a GPU sends to.
        hop_latency_s: latency of one step of a ring allreduce.
        fairness: ``"collective"`` (default): concurrent collectives get equal weight on a NIC,
            whatever their number of flows (NCCL runs each collective on a fixed set of channels);
            ``"flow"``: max-min fairness among transport connections: a flow (one rank to one
            peer) weighs as many connections as it runs on. TCP connections through one queue share
            a link about per connection; this is what reproduces the emulated links' measured
            contention (:mod:`lina.sim.contention`).
        a2a_connections: connections one all-to-all flow runs on (``"flow"`` fairness): Gloo
            opens one per pair of ranks and process group.
        allreduce_connections: connections one allreduce flow (a ring step to the successor)
            runs on (``"flow"`` fairness): one with Gloo's ring.
        host: what the hosts' CPUs impose when the collectives run on them (the emulated
            cluster of processes on one machine, :class:`CpuHostModel`); ``None`` (GPU clusters,
            the paper's scenarios): no such terms. A TOML ``[cluster.host]`` table gives it.
    """

    hosts: int
    gpus_per_host: int
    link_gbps: float
    nics_per_host: int = 1
    nvlink_gbps: float = 2400.0
    link_efficiency: float = 1.0
    launch_s: float = 20e-6
    per_peer_s: float = 2e-6
    hop_latency_s: float = 5e-6
    fairness: str = "collective"
    host: CpuHostModel | None = None
    a2a_connections: int = 1
    allreduce_connections: int = 1

    def __post_init__(self):
        _integer(self, "hosts", "gpus_per_host", "nics_per_host", "a2a_connections", "allreduce_connections")
        _positive(self, "link_gbps", "nvlink_gbps", "link_efficiency")
        _non_negative(self, "launch_s", "per_peer_s", "hop_latency_s")
        if isinstance(self.host, dict):  # a [cluster.host] table
            object.__setattr__(self, "host", spec_from_dict(CpuHostModel, self.host, "cluster.host"))
        if self.host is not None and not isinstance(self.host, CpuHostModel):
            raise ConfigError(
                "host", f"{self.host!r} is not a CPU host model", "give a CpuHostModel, a [cluster.host] table, or None"
            )
        if self.link_efficiency > 1:
            raise ConfigError("link_efficiency", f"{self.link_efficiency} is above 1", "use a fraction in (0, 1]")
        if self.gpus_per_host % self.nics_per_host:
            raise ConfigError(
                "nics_per_host",
                f"{self.nics_per_host} NICs do not split {self.gpus_per_host} GPUs evenly",
                "use a divisor of gpus_per_host (1 NIC per host, or 1 per GPU)",
            )
        if self.fairness not in FAIRNESS_MODES:
            raise ConfigError("fairness", f"unknown mode {self.fairness!r}", f"use one of {', '.join(FAIRNESS_MODES)}")

    @property
    def gpus(self) -> int:
        return self.hosts * self.gpus_per_host

    @property
    def allreduce_start_s(self) -> float:
        """What launching one allreduce costs (the host model's ``allreduce_launch_s``, else ``launch_s``)."""
        if self.host is None or self.host.allreduce_launch_s is None:
            return self.launch_s
        return self.host.allreduce_launch_s

    @property
    def a2a_in_flight(self) -> int:
        """All-to-all operations one rank runs at once: 1 on GPUs (one communication stream), else the host model's."""
        return 1 if self.host is None else self.host.a2a_in_flight

    @property
    def nic_bytes_per_s(self) -> float:
        return self.link_gbps * 1e9 / 8 * self.link_efficiency

    @property
    def nvlink_bytes_per_s(self) -> float:
        return self.nvlink_gbps * 1e9 / 8

    def describe(self) -> str:
        nic = f"{self.nics_per_host}x{self.link_gbps:g} Gb/s" if self.nics_per_host > 1 else f"{self.link_gbps:g} Gb/s"
        return f"{self.hosts} hosts x {self.gpus_per_host} GPUs, {nic} per host"


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a MoE transformer, as far as time and bytes go.

    ``seq_len * batch_size`` tokens per device per step (training) or per batch (inference).
    Every ``moe_every``-th layer's FFN is a MoE layer of ``experts`` experts, top-``top_k``.
    ``act_bytes``: bytes per activation element sent by an all-to-all; ``grad_bytes``: bytes
    per gradient element allreduced; ``param_bytes``: bytes per weight read by a kernel.
    """

    name: str
    layers: int
    d_model: int
    d_ff: int
    experts: int
    top_k: int
    seq_len: int
    batch_size: int
    vocab: int = 50257
    moe_every: int = 1
    act_bytes: int = 2
    grad_bytes: int = 4
    param_bytes: int = 2
    capacity_factor: float = 1.0

    def __post_init__(self):
        _integer(self, "layers", "d_model", "d_ff", "experts", "top_k", "seq_len", "batch_size", "vocab", "moe_every")
        _integer(self, "act_bytes", "grad_bytes", "param_bytes")
        _positive(self, "capacity_factor")
        if self.top_k > self.experts:
            raise ConfigError("top_k", f"{self.top_k} is more than the {self.experts} experts", "use top_k <= experts")

    @property
    def tokens(self) -> int:
        """Tokens per device per step."""
        return self.seq_len * self.batch_size

    @property
    def moe_layers(self) -> int:
        return sum(1 for i in range(self.layers) if self.is_moe(i))

    def is_moe(self, layer: int) -> bool:
        return (layer + 1) % self.moe_every == 0

    @property
    def a2a_bytes(self) -> float:
        """Bytes one device sends in one dispatch (or combine) all-to-all of a training step."""
        return self.capacity_factor * self.tokens * self.top_k * self.d_model * self.act_bytes

    @property
    def expert_params(self) -> int:
        """Parameters of one expert FFN (two matrices and biases)."""
        return 2 * self.d_model * self.d_ff + self.d_model + self.d_ff

    def dense_tensors(self, layer: int) -> list[tuple[str, int]]:
        """Data-parallel parameter tensors of one layer, ``(name, numel)``, in registration order."""
        d = self.d_model
        out = [
            (f"L{layer}.attn.qkv", 3 * d * d + 3 * d),
            (f"L{layer}.attn.out", d * d + d),
            (f"L{layer}.ln1", 2 * d),
            (f"L{layer}.ln2", 2 * d),
        ]
        if self.is_moe(layer):
            out.append((f"L{layer}.gate", d * self.experts))
        else:
            out.append((f"L{layer}.ffn", self.expert_params))
        return out

    def embedding_tensors(self) -> list[tuple[str, int]]:
        return [
            ("embed.tok", self.vocab * self.d_model),
            ("embed.pos", self.seq_len * self.d_model),
            ("ln_f", 2 * self.d_model),
        ]

    @property
    def total_params(self) -> int:
        dense = sum(n for i in range(self.layers) for _, n in self.dense_tensors(i))
        dense += sum(n for _, n in self.embedding_tensors())
        return dense + self.moe_layers * self.experts * self.expert_params

    def describe(self) -> str:
        return (
            f"{self.name}: {self.layers}L d={self.d_model} ff={self.d_ff} E={self.experts} top-{self.top_k}, "
            f"{self.tokens} tokens/device, {self.total_params / 1e6:.0f}M params"
        )


@dataclass(frozen=True)
class TrainSpec:
    """How a training step runs, beside the policy being compared.

    Args:
        chunk_mb: Lina's micro-op size (gradient chunks and all-to-all micro-ops), MB.
        bucket_mb: DDP bucket size of the baselines, MB.
        tutel_chunks: how many pieces Tutel splits an all-to-all into to overlap it with FFN.
        lina_a2a_chunks: pieces of Lina's pipelined all-to-all (``None``: as many ``chunk_mb``
            micro-ops as the all-to-all needs, as in the paper; the project's trainer uses a
            fixed count, ``pipeline_chunks``).
        credit_window: allreduce micro-ops Lina lets run at once.
        a2a_algorithm: ``pairwise`` (every pair at once) or ``hierarchical`` (intra-host, then
            inter-host among GPUs of the same local index).
        allreduce_algorithm: ``ring`` (one ring per NIC over all members) or ``hierarchical``
            (reduce-scatter in the host, ring across hosts, all-gather in the host).
        ep_size: GPUs in one expert-parallel group (``None``: ``min(experts, gpus)``).
        max_pack: cap on Lina's packing factor (``None``: until the group is one GPU).
        count_exchange: before each forward dispatch, a tiny all-to-all of per-expert token
            counts (dropless routing, as the project's trainer does); costs its latency.
        state_bytes_per_param: device memory per parameter (weights, gradient, optimizer
            state; 16 for Adam in mixed precision); packing stops before the model states
            exceed ``memory_fraction`` of the device memory (the paper offloads instead;
            offloading is not simulated).
        coalesce_small: as the real ``lina`` policy, dense tensors under a quarter chunk share
            micro-ops (in gradient-ready order, up to one chunk) instead of one micro-op each.
        a2a_skew: routing imbalance of the all-to-alls: the busiest rank's bytes (the larger of
            what it sends and what it receives) over what the mean rank sends. An all-to-all
            ends when its busiest rank is done, so the simulated all-to-alls move the busiest
            rank's bytes (1.0: every rank sends and receives the same, as uniform routing does;
            :func:`lina.sim.a2a_skew.a2a_skew` measures it from a run's timelines).
    """

    chunk_mb: float = 30.0
    bucket_mb: float = 25.0
    tutel_chunks: int = 2
    lina_a2a_chunks: int | None = None
    credit_window: int = 1
    a2a_algorithm: str = "pairwise"
    allreduce_algorithm: str = "ring"
    ep_size: int | None = None
    max_pack: int | None = None
    count_exchange: bool = False
    state_bytes_per_param: float = 16.0
    memory_fraction: float = 0.8
    coalesce_small: bool = True
    a2a_skew: float = 1.0

    def __post_init__(self):
        _positive(self, "chunk_mb", "bucket_mb")
        if not self.a2a_skew >= 1.0:
            raise ConfigError(
                "a2a_skew",
                f"{self.a2a_skew!r} is below 1",
                "give the busiest rank's all-to-all bytes over the mean rank's (1.0: uniform)",
            )
        _integer(self, "tutel_chunks", "credit_window")
        if self.a2a_algorithm not in A2A_ALGORITHMS:
            raise ConfigError(
                "a2a_algorithm", f"unknown {self.a2a_algorithm!r}", f"use one of {', '.join(A2A_ALGORITHMS)}"
            )
        if self.allreduce_algorithm not in ALLREDUCE_ALGORITHMS:
            raise ConfigError(
                "allreduce_algorithm",
                f"unknown {self.allreduce_algorithm!r}",
                f"use one of {', '.join(ALLREDUCE_ALGORITHMS)}",
            )
        _positive(self, "state_bytes_per_param", "memory_fraction")
        if self.lina_a2a_chunks is not None:
            _integer(self, "lina_a2a_chunks")
        if self.ep_size is not None:
            _integer(self, "ep_size")
        if self.max_pack is not None:
            _integer(self, "max_pack")

    @property
    def chunk_bytes(self) -> float:
        return self.chunk_mb * 1e6

    @property
    def bucket_bytes(self) -> float:
        return self.bucket_mb * 1e6


def resolve_ep(cluster: ClusterSpec, model: ModelSpec, train: TrainSpec) -> int:
    """Expert-parallel group size, checked against the cluster and model.

    Groups are contiguous ranks; a group must be whole hosts or a divisor of a host, so that
    every host sees the same traffic (what the simulator's symmetry reduction relies on).
    """
    n = cluster.gpus
    ep = train.ep_size if train.ep_size is not None else min(model.experts, n)
    if n % ep:
        raise ConfigError("ep_size", f"{ep} does not divide the {n} GPUs", "use a divisor of hosts * gpus_per_host")
    if ep <= model.experts and model.experts % ep:
        raise ConfigError("ep_size", f"{model.experts} experts do not split over {ep} GPUs", "use a divisor of experts")
    if ep > model.experts:
        raise ConfigError("ep_size", f"{ep} GPUs per group but only {model.experts} experts", "use ep_size <= experts")
    g = cluster.gpus_per_host
    if ep % g and g % ep:
        raise ConfigError(
            "ep_size",
            f"a group of {ep} GPUs neither fills whole hosts of {g} nor divides one",
            f"use a multiple or a divisor of {g}",
        )
    return ep


def spec_from_dict(cls, data: dict, section: str):
    """Build ``cls`` from a TOML table, naming unknown keys as errors."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"[{section}] {unknown[0]}", "is not a known setting", f"use some of: {', '.join(sorted(known))}"
        )
    try:
        return cls(**data)
    except TypeError as err:
        raise ConfigError(f"[{section}]", str(err), f"give every required setting: {', '.join(sorted(known))}") from err


__all__ = [
    "ClusterSpec",
    "CpuHostModel",
    "ModelSpec",
    "DeviceSpec",
    "TrainSpec",
    "DEVICES",
    "resolve_ep",
    "spec_from_dict",
]

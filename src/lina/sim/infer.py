"""Inference batches on a simulated cluster, with the real system's placement policies.

Per batch, every MoE layer, as the real engine (:mod:`lina.infer.engine`) runs it:

1. dense compute of the device's tokens;
2. a small header all-to-all (counts, Lina's phase-1 estimate of the next layer);
3. the policy's placement of this layer (``lina``: phase 2, re-plan if the estimated top-2k
   experts are not the real ones);
4. dispatch all-to-all: token-slots to replicas, split exactly as
   :func:`lina.infer.engine.replica_rows` splits them;
5. expert compute on every device (the batch waits for the busiest);
6. combine all-to-all back; ``lina``'s coordinator plans the next layer meanwhile.

The placement policies ARE the real ones: :func:`lina.infer.policies.make_serving_policy`
(``static``, ``eplb``, ``lina``, ``oracle``) on :mod:`lina.placement`, fed the batch's real
counts and token paths from a :class:`lina.data.routing_trace.RoutingTrace`.

All-to-all time: an inference all-to-all runs alone (no gradient traffic), so by default its
time is its bottleneck: the most loaded NIC or NVLink port's bytes over its rate, plus the
launch and per-peer costs. ``InferSpec.exact_network`` runs the flow-level max-min simulation
instead (slower; the tests check the two agree on skewed traffic).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lina.data.routing_trace import RoutingTrace
from lina.errors import ConfigError
from lina.infer.engine import replica_rows
from lina.infer.policies import SERVING_POLICIES, make_serving_policy
from lina.placement.estimators.base import PopularityEstimator
from lina.placement.static import static_placement
from lina.sim.collectives import all_to_all_matrix
from lina.sim.compute import ComputeProfile
from lina.sim.spec import ClusterSpec, ModelSpec
from lina.sim.topology import Topology
from lina.sim.train import transfer_time

INFER_POLICIES = tuple(SERVING_POLICIES)  # every registered serving policy


@dataclass(frozen=True)
class InferSpec:
    """How inference batches run.

    Args:
        tokens_per_device: tokens each device brings to a batch.
        batches: batches measured; ``warmup_batches`` run first (EPLB's average fills).
        phase1_s: coordinator planning time of the next layer (overlapped with this layer's
            expert compute and combine; only the excess shows).
        phase2_check_s: the top-2k comparison after the real gate, per layer.
        replan_s: a blocking re-plan on the real counts.
        host_to_device_gbs: rate expert weights load from host memory when they are not all
            resident on every device.
        resident: every expert of every layer fits on every device (no weight loads);
            ``None``: decided from the device memory.
        eplb_replan_every: batches between EPLB re-plans.
        exact_network: flow-level all-to-all instead of the bottleneck time.
    """

    tokens_per_device: int = 2048
    batches: int = 30
    warmup_batches: int = 6
    phase1_s: float = 1e-3
    phase2_check_s: float = 0.2e-3
    replan_s: float = 1e-3
    host_to_device_gbs: float = 25.0
    resident: bool | None = None
    eplb_replan_every: int = 4
    exact_network: bool = False

    def __post_init__(self):
        for name in ("tokens_per_device", "batches", "eplb_replan_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(name, f"must be a whole number >= 1, got {v!r}", f"set {name} to 1 or more")
        if not isinstance(self.warmup_batches, int) or self.warmup_batches < 0:
            raise ConfigError("warmup_batches", f"got {self.warmup_batches!r}", "use 0 or more")
        for name in ("phase1_s", "phase2_check_s", "replan_s"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "is negative", "give seconds >= 0")
        if self.host_to_device_gbs <= 0:
            raise ConfigError("host_to_device_gbs", "must be positive", "give the host-to-GPU copy rate in GB/s")


def a2a_bottleneck_time(cluster: ClusterSpec, traffic: np.ndarray) -> float:
    """Time of an all-to-all alone: busiest port's bytes / rate + launch + per-peer costs.

    Args:
        traffic: ``[N, N]`` bytes from rank i to rank j (the diagonal stays local).
    """
    n = traffic.shape[0]
    g, nics = cluster.gpus_per_host, cluster.nics_per_host
    t = traffic * (1 - np.eye(n))
    host = np.arange(n) // g
    nic = host * nics + (np.arange(n) % g) * nics // g
    same = host[:, None] == host[None, :]
    intra = np.where(same, t, 0.0)
    inter = np.where(same, 0.0, t)
    nic_out = np.bincount(nic, weights=inter.sum(axis=1), minlength=cluster.hosts * nics)
    nic_in = np.bincount(nic, weights=inter.sum(axis=0), minlength=cluster.hosts * nics)
    busiest = max(nic_out.max(), nic_in.max()) / cluster.nic_bytes_per_s
    busiest = max(busiest, max(intra.sum(axis=1).max(), intra.sum(axis=0).max()) / cluster.nvlink_bytes_per_s)
    peers = int((t > 0).sum(axis=1).max()) if n > 1 else 0
    return cluster.launch_s + cluster.per_peer_s * peers + busiest


@dataclass
class InferResult:
    """Per-batch latencies (seconds) of one policy, and where they went."""

    policy: str
    latencies_s: list[float]
    layer_a2a_s: list[float]
    layer_expert_s: list[float]
    replans: int = 0
    checked: int = 0
    exposed_sched_s: float = 0.0
    sim_wall_s: float = 0.0
    speedup_median: float | None = None
    speedup_p95: float | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.latencies_s)

    @property
    def p95_s(self) -> float:
        return float(np.percentile(self.latencies_s, 95))

    @property
    def a2a_p95_s(self) -> float:
        return float(np.percentile(self.layer_a2a_s, 95))

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "median_s": self.median_s,
            "p95_s": self.p95_s,
            "min_s": min(self.latencies_s),
            "max_s": max(self.latencies_s),
            "layer_a2a_p95_s": self.a2a_p95_s,
            "layer_a2a_median_s": statistics.median(self.layer_a2a_s),
            "layer_expert_median_s": statistics.median(self.layer_expert_s),
            "replans": self.replans,
            "checked": self.checked,
            "exposed_sched_s": self.exposed_sched_s,
            "speedup_median": self.speedup_median,
            "speedup_p95": self.speedup_p95,
            "batches": len(self.latencies_s),
            "sim_wall_s": self.sim_wall_s,
        }


@dataclass
class _Costs:
    cluster: ClusterSpec
    model: ModelSpec
    profile: ComputeProfile
    spec: InferSpec
    resident: bool
    topo: Topology | None = field(default=None)

    def a2a(self, slots: np.ndarray) -> float:
        traffic = slots * self.model.d_model * self.model.act_bytes
        if self.spec.exact_network:
            return transfer_time(self.topo, all_to_all_matrix(self.topo, traffic))
        return a2a_bottleneck_time(self.cluster, traffic)

    def expert_busiest(self, recv: np.ndarray) -> float:
        """``recv``: ``[E, N]`` token-slots each device computes per expert -> busiest device's seconds."""
        per_token = self.profile.expert_fwd_s_per_token
        floor = self.profile.expert_min_s
        times = np.where(recv > 0, np.maximum(recv * per_token, floor), 0.0).sum(axis=0)
        return float(times.max())

    def load_time(self, placement) -> float:
        """Seconds until every device holds the weights ``placement`` gives it.

        A device always holds its static (DeepSpeed-layout) experts; any other expert it is
        given is copied from host memory, unless every expert is resident.
        """
        if self.resident:
            return 0.0
        home = static_placement(placement.num_experts, placement.num_devices).holds
        extra = int((placement.holds & ~home).sum(dim=0).max())
        nbytes = extra * self.model.expert_params * self.model.param_bytes
        return nbytes / (self.spec.host_to_device_gbs * 1e9)


def resident_fits(model: ModelSpec, memory_gb: float | None) -> bool:
    """Every expert of every layer on every device within 80 % of the device memory."""
    if memory_gb is None:
        return True
    return model.moe_layers * model.experts * model.expert_params * model.param_bytes <= 0.8 * memory_gb * 1e9


def simulate_inference(
    cluster: ClusterSpec,
    model: ModelSpec,
    profile: ComputeProfile,
    spec: InferSpec,
    trace: RoutingTrace,
    estimator: PopularityEstimator | None,
    policies: tuple[str, ...] = INFER_POLICIES,
    memory_gb: float | None = None,
    progress=None,
) -> dict[str, InferResult]:
    """Replay ``trace`` batch by batch under each policy; ``speedup_*`` relative to ``static``.

    Args:
        trace: routing of the simulated batches (``[T, L, k]``; ``L`` must be the model's MoE
            layers, ``E`` its experts); tokens ``[b * N * t, (b + 1) * N * t)`` form batch ``b``,
            device ``n`` holding the ``n``-th block of ``t = spec.tokens_per_device``.
        estimator: fitted popularity estimator (needed by ``lina``), on a different trace.
    """
    n = cluster.gpus
    if trace.num_experts != model.experts or trace.num_layers != model.moe_layers:
        raise ConfigError(
            "trace",
            f"has {trace.num_layers} layers x {trace.num_experts} experts, the model "
            f"{model.moe_layers} x {model.experts}",
            "give a trace recorded from this model shape",
        )
    per_batch = n * spec.tokens_per_device
    needed = (spec.warmup_batches + spec.batches) * per_batch
    if trace.num_tokens < needed:
        raise ConfigError(
            "batches",
            f"{spec.warmup_batches}+{spec.batches} batches of {per_batch} tokens need {needed} tokens, the trace "
            f"has {trace.num_tokens}",
            "use fewer batches or tokens per device, or a longer trace",
        )
    resident = spec.resident if spec.resident is not None else resident_fits(model, memory_gb)
    costs = _Costs(
        cluster, model, profile, spec, resident, Topology(cluster, representative=False) if spec.exact_network else None
    )
    experts_all = trace.experts.astype(np.int64)
    results = {}
    for name in policies:
        started = time.perf_counter()
        policy = make_serving_policy(
            name, model.experts, n, model.top_k, model.moe_layers, estimator, spec.eplb_replan_every
        )
        res = InferResult(name, [], [], [])
        for b in range(spec.warmup_batches + spec.batches):
            ids = experts_all[b * per_batch : (b + 1) * per_batch]
            latency, a2a, expert, sched = _batch(policy, ids, costs)
            if b >= spec.warmup_batches:
                res.latencies_s.append(latency)
                res.layer_a2a_s += a2a
                res.layer_expert_s += expert
                res.exposed_sched_s += sched
        res.replans = policy.stats["replans"]
        res.checked = policy.stats["checked"]
        res.sim_wall_s = time.perf_counter() - started
        results[name] = res
        if progress is not None:
            progress(res)
    if "static" in results:
        base = results["static"]
        for r in results.values():
            r.speedup_median = base.median_s / r.median_s
            r.speedup_p95 = base.p95_s / r.p95_s
    return results


def batch_estimate(policy, layer: int, paths: torch.Tensor) -> torch.Tensor | None:
    """The summed phase-1 estimate of all devices' tokens, as ``policy.local_estimate`` gives it.

    Tokens with the same last ``path_len`` top-1 experts get the same prediction, so the
    estimator's :meth:`predict` runs once per distinct path and the top-k slot shares (as
    :meth:`PopularityEstimator.popularity` computes them, in the policy's mode) are weighted by the
    path's token count. Equal to ``policy.local_estimate(layer, paths)`` (a test checks it),
    tens of times faster on big batches. Falls back to that call for estimators without
    ``path_len``.

    Args:
        paths: ``LongTensor[T, h]`` top-1 experts of every token through the current layer.
    Returns:
        ``Tensor[E]`` float64, or ``None`` when the policy has no estimate for ``layer``.
    """
    estimator = getattr(policy, "estimator", None)
    path_len = getattr(estimator, "path_len", None)
    if estimator is None or path_len is None or layer >= estimator.num_layers or paths.shape[1] == 0:
        return policy.local_estimate(layer, paths)
    tail = (paths[:, -path_len:] if path_len > 0 else paths[:, :0]).numpy().astype(np.int64)
    e = estimator.num_experts
    keys = np.zeros(tail.shape[0], dtype=np.int64)
    for c in range(tail.shape[1]):
        keys = keys * e + tail[:, c]
    uniq_keys, first, weight = np.unique(keys, return_index=True, return_counts=True)
    probs = estimator.predict(layer, torch.from_numpy(tail[first])).double()
    weight = torch.from_numpy(weight)
    k = policy.top_k
    if getattr(policy, "popularity_mode", "topk") == "expected":
        return (probs * k * weight.double()[:, None]).sum(dim=0)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep.scatter_(1, torch.topk(probs, min(k, probs.shape[1]), dim=1).indices, True)
    return (probs * k * keep * weight.double()[:, None]).sum(dim=0)


def _batch(policy, ids: np.ndarray, costs: _Costs) -> tuple[float, list[float], list[float], float]:
    """One batch: ``ids`` ``[N * t, L, k]``. Returns latency, per-layer a2a and expert times, exposed scheduling."""
    model, spec, prof = costs.model, costs.spec, costs.profile
    n = costs.cluster.gpus
    t = spec.tokens_per_device
    e, layers = model.experts, ids.shape[1]
    ids_t = torch.from_numpy(ids)
    source = np.repeat(np.arange(n), t)
    counts = np.zeros((layers, n, e))
    src_slot = np.repeat(source, ids.shape[2]) * e
    for layer in range(layers):
        counts[layer] = np.bincount(src_slot + ids[:, layer].reshape(-1), minlength=n * e).reshape(n, e)
    policy.begin_batch(torch.from_numpy(counts.sum(axis=1)))
    dense = prof.dense_time(t)
    latency = (prof.head_fwd_s_per_token * t) if prof.head_fwd_s_per_token else 0.0
    a2a_times, expert_times = [], []
    exposed = 0.0
    pending_load = 0.0  # weights of this layer still loading when it starts
    for layer in range(layers):
        latency += dense + max(0.0, pending_load - dense)
        exposed += max(0.0, pending_load - dense)
        pending_load = 0.0
        header = costs.cluster.launch_s + costs.cluster.per_peer_s * (n - 1)
        estimate = None
        if policy.uses_phase1 and layer + 1 < layers:
            estimate = batch_estimate(policy, layer + 1, ids_t[:, : layer + 1, 0])
        replans_before = policy.stats["replans"]
        checked_before = policy.stats["checked"]
        placement = policy.placement(layer, torch.from_numpy(counts[layer].sum(axis=0)))
        sched = 0.0
        if policy.stats["checked"] > checked_before:
            sched += spec.phase2_check_s
        if policy.stats["replans"] > replans_before:
            sched += spec.replan_s + costs.load_time(placement)
        rows = replica_rows(torch.from_numpy(counts[layer]), placement).numpy().astype(float)  # [S, E, N]
        slots = rows.sum(axis=1)  # [S, N]
        recv = rows.sum(axis=0)  # [E, N]
        dispatch = costs.a2a(slots)
        expert = costs.expert_busiest(recv)
        combine = costs.a2a(slots.T)
        overlap = expert + combine
        phase1 = 0.0
        if estimate is not None:
            plan = policy.coordinate(layer + 1, estimate)
            policy.receive_plan(layer + 1, plan, estimate)
            phase1 = max(0.0, spec.phase1_s - overlap)
            pending_load = costs.load_time(plan)
        latency += header + sched + dispatch + expert + combine + phase1
        exposed += sched + phase1
        a2a_times.append(header + dispatch + combine)
        expert_times.append(expert)
    if policy.needs_batch_counts:
        policy.end_batch(torch.from_numpy(counts.sum(axis=1)))
    return latency, a2a_times, expert_times, exposed

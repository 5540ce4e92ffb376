"""Fitting the simulator's parameters to measured runs (pooled over all runs, so a prediction is
not its own measurement played back).

- compute, per token on one whole core: non-expert forward/backward (the passes minus their
  all-to-alls minus expert FFN; embedding and head included), expert FFN forward/backward (per
  routed token; backward from ``bwd`` expert spans, else the backward/forward ratio of the
  passes), and the optimizer per local parameter (step end after backward and every allreduce);
  how compute time grows as ranks share cores (:func:`lina.sim.calibration.host.fit_core_exponent`);
  a fixed cost per layer when the runs have more than one token count (:func:`fit_per_layer`);
  how much later than the mean the last rank reaches an all-to-all (straggling);
- contention: the share of compute speed lost while an all-to-all, or an allreduce, is in flight
  (:func:`fit_slowdowns`), from how much longer the same shape computes under policies that
  overlap more; the per-token costs above are then those at full speed;
- network (:mod:`lina.sim.calibration.links`): link efficiency, allreduce launch and per-ring-step
  latency, all-to-all latency and the emulated cluster's limits (per-core and per-flow rates,
  goodput lost per extra flow), the loopback rate (:func:`fit_loopback_to_steps`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from lina.errors import LinaError
from lina.sim.calibration.host import core_sharers, exponent_of, fit_core_exponent, host_model, on_core_share
from lina.sim.calibration.layout import busiest_link_bytes, ep_of, group_ranks_per_host, shape_key
from lina.sim.calibration.links import fit_a2a, fit_allreduce, fit_loopback
from lina.sim.calibration.observations import RunObs, median, observe
from lina.sim.calibration.prediction import predict
from lina.sim.calibration.runs import RunRecord
from lina.sim.compute import ComputeProfile
from lina.sim.spec import ClusterSpec
from lina.sim.train_step import StepPlan

# intra-host link rate / host link rate when no loopback all-to-all was measured: above what the
# rank copy limit lets a rank send
INTRA_FACTOR = 10.0


@dataclass
class CalibrationFit:
    profile: ComputeProfile
    link_efficiency: float
    a2a_latency_s: float
    allreduce_launch_s: float
    allreduce_hop_s: float
    intra_factor: float
    a2a_samples: int
    allreduce_samples: int
    note: str = ""
    core_copy_bytes_per_s: float | None = (
        None  # all-to-all bytes a rank sends per second per whole core (None: no limit)
    )
    flow_copy_bytes_per_s: float | None = (
        None  # bytes per second of one all-to-all flow to another host (None: no limit)
    )
    core_exponent: float = 1.0  # compute time ~ (cores per rank) ** -core_exponent
    core_exponent_no_a2a: float | None = None  # the same for steps without all-to-all (None: core_exponent)
    allreduce_slowdown_per_sharer: float = 0.0  # allreduce speed lost while computing, per other rank on the same core
    loopback_bytes_per_s: float | None = (
        None  # all-to-all bytes to ranks of the same host per second per whole core (None: not fitted)
    )
    pair_flow_loss: float = 0.0  # host-link goodput lost per extra flow of one all-to-all between two hosts
    loopback_samples: int = 0
    loopback_sampled_bytes_per_s: float | None = (
        None  # what the uncontended loopback all-to-alls alone give (least squares)
    )
    loopback_step_runs: int = 0  # runs whose step times the loopback rate was fitted to (0: the samples' rate kept)

    def profile_for(self, run: RunRecord) -> ComputeProfile:
        """The fitted profile on ``run``'s share of the cores (costs and allreduce slowdown)."""
        return self.profile_at(run, run.core_share ** self.exponent_for(run))

    def profile_at(self, run: RunRecord, speed: float) -> ComputeProfile:
        """The fitted profile computing at ``speed`` of a whole core, with ``run``'s collective slowdowns."""
        if run.device_mode:  # compute is the device model: no core sharing, no CPU contention
            return replace(
                self.profile,
                slowdown_in_a2a=0.0,
                slowdown_in_allreduce=0.0,
                allreduce_slowdown_in_compute=0.0,
                loopback_slowdown_in_compute=0.0,
            )
        slow = min(0.9, self.allreduce_slowdown_per_sharer * core_sharers(run))
        # loopback copies are CPU work like the allreduce's: they lose the same share beside compute
        loop = slow if self.loopback_bytes_per_s is not None else 0.0
        profile = replace(self.profile, allreduce_slowdown_in_compute=slow, loopback_slowdown_in_compute=loop)
        return on_core_share(profile, speed)

    def exponent_for(self, run: RunRecord) -> float:
        """The core-sharing exponent of ``run``'s kind (see :func:`fit_core_exponent`)."""
        if run.device_mode:  # device time does not depend on this machine's cores
            return 0.0
        return exponent_of(run, self.core_exponent, self.core_exponent_no_a2a)

    def cluster_for(self, run: RunRecord) -> ClusterSpec:
        """The emulated cluster of ``run`` as the simulator takes it: links, latencies and its CPU host
        (none for a device-time run: its compute is the device model, only network terms apply)."""
        gbps = run.link_bps / 1e9
        return ClusterSpec(
            hosts=run.hosts,
            gpus_per_host=run.workers_per_host,
            link_gbps=gbps,
            nvlink_gbps=gbps * self.intra_factor
            if self.loopback_bytes_per_s is None
            else self.loopback_bytes_per_s * run.core_share * 8 / 1e9,
            link_efficiency=min(1.0, self.link_efficiency),
            launch_s=self.a2a_latency_s,
            per_peer_s=0.0,
            hop_latency_s=self.allreduce_hop_s,
            # a device-time run's collectives see only the network: no CPU host terms, and its links
            # shared per connection, as the emulated links measure (lina.sim.contention)
            host=None if run.device_mode else host_model(self, run),
            fairness="flow" if run.device_mode else "collective",
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "profile": self.profile.to_dict()}


def fit_per_layer(layers: np.ndarray, tokens: np.ndarray, seconds: np.ndarray) -> tuple[float, float]:
    """(fixed seconds per layer, seconds per token and layer) of runs' non-expert pass times.

    ``seconds[i]`` is run ``i``'s pass over ``layers[i]`` layers of ``tokens[i]`` tokens each:
    least squares of ``seconds / layers = fixed + per_token * tokens`` when the runs have more
    than one token count (and the fixed cost comes out non-negative); otherwise no fixed cost
    and the pooled per-token cost.
    """
    per_layer = seconds / layers
    if len(np.unique(tokens)) > 1:
        (per_token, fixed), *_ = np.linalg.lstsq(
            np.stack([tokens, np.ones_like(tokens)], axis=1), per_layer, rcond=None
        )
        if fixed >= 0 and per_token >= 0:
            return float(fixed), float(per_token)
    return 0.0, max(0.0, float(seconds.sum() / (layers * tokens).sum()))


def fit_slowdowns(runs: list[RunRecord], obs: list[RunObs]) -> tuple[float, float]:
    """Share of compute speed lost while an all-to-all / an allreduce is in flight.

    Each run's median compute per step is ``W + a * O_a2a + r * O_allreduce``: ``W`` the work of its
    shape (shared by the runs of one shape, which differ only in policy) and ``O`` the compute time
    spent with that collective in flight. Fitted by least squares within shapes that have at least
    two runs (a lone run cannot tell work from slowdown); each share is kept in [0, 0.9].
    """
    by_shape: dict[tuple, list[tuple[float, float, float]]] = {}
    for r, o in zip(runs, obs):
        row = (
            o.compute_s,
            median([s.a2a_overlap_s for s in o.steps]),
            median([s.allreduce_overlap_s for s in o.steps]),
        )
        by_shape.setdefault(shape_key(r), []).append(row)
    ys, xs = [], []
    for rows in by_shape.values():
        if len(rows) < 2:
            continue
        mean = np.mean(np.asarray(rows), axis=0)
        for row in rows:
            d = np.asarray(row) - mean
            ys.append(d[0])
            xs.append(d[1:])
    if len(ys) < 2:
        return 0.0, 0.0
    coef, *_ = np.linalg.lstsq(np.asarray(xs), np.asarray(ys), rcond=1e-9)
    a2a, allreduce = (float(v) for v in coef)
    if a2a < 0 or allreduce < 0:  # a negative share is noise: refit the other alone
        keep = 0 if a2a >= allreduce else 1
        x = np.asarray(xs)[:, keep]
        value = float(x @ np.asarray(ys) / (x @ x)) if x @ x > 0 else 0.0
        a2a, allreduce = (value, 0.0) if keep == 0 else (0.0, value)
    return min(max(a2a, 0.0), 0.9), min(max(allreduce, 0.0), 0.9)


def fit(runs: list[RunRecord]) -> CalibrationFit:
    """Fit compute and link parameters to ``runs`` (pooled; see the module docstring)."""
    obs = [observe(r) for r in runs]
    slow_a2a, slow_ar = fit_slowdowns(runs, obs)
    exponent, exponent_no_a2a = fit_core_exponent(runs, obs)

    def exponent_for(r: RunRecord) -> float:
        return exponent_of(r, exponent, exponent_no_a2a)

    # ranks drift apart between all-to-alls; the step runs at the pace of the last to arrive
    computed = sum(o.compute_s for o in obs)
    # a share of the compute, in [0, 1] (a few steps' waits can sum below 0 from clock offsets between ranks)
    straggler = min(1.0, max(0.0, sum(o.sync_wait_s for o in obs) / computed)) if computed > 0 else 0.0
    dense_rows = []  # per run: (layers, tokens, forward and backward non-expert seconds at full speed on a whole core)
    slot_layers = e_fwd = e_bwd = 0.0
    params = tail = 0.0
    for r, o in zip(runs, obs):
        m = r.model
        # Work at full speed: take off what the collectives in flight cost (see fit_slowdowns).
        fd = median([s.fwd_dense_s - slow_ar * s.allreduce_overlap_fwd_s for s in o.steps])
        ef = median([s.fwd_expert_s - slow_a2a * s.a2a_overlap_fwd_s for s in o.steps])
        br = median([s.bwd_rest_s - slow_ar * s.allreduce_overlap_bwd_s for s in o.steps])
        if all(s.bwd_expert_s is not None for s in o.steps):
            eb = median([s.bwd_expert_s - slow_a2a * s.a2a_overlap_bwd_s for s in o.steps])
            bd = br
        else:  # backward expert compute hides in the pass: split it like the forward
            ratio = br / (fd + ef) if fd + ef > 0 else 2.0
            eb = ef * ratio
            bd = br - eb
        share = r.core_share ** exponent_for(r)  # costs are fitted per whole core (see fit_core_exponent)
        fd, ef, bd, eb = fd * share, ef * share, bd * share, eb * share
        dense_rows.append((m.layers, m.tokens, fd, bd))
        slot_layers += m.moe_layers * m.tokens * m.top_k * m.capacity_factor
        e_fwd += ef
        e_bwd += eb
        plan = StepPlan(ClusterSpec(r.hosts, r.workers_per_host, r.link_bps / 1e9), m, None, r.train, ep_of(r))
        params += plan.local_params()
        tail += median([s.tail_s for s in o.steps]) * r.core_share ** exponent_for(r)
    rows = np.asarray(dense_rows)
    layer_fwd, dense_fwd = fit_per_layer(rows[:, 0], rows[:, 1], rows[:, 2])
    layer_bwd, dense_bwd = fit_per_layer(rows[:, 0], rows[:, 1], rows[:, 3])
    profile = ComputeProfile(
        dense_fwd_s_per_token=dense_fwd,
        dense_bwd_s_per_token=dense_bwd,
        layer_fwd_s=layer_fwd,
        layer_bwd_s=layer_bwd,
        expert_fwd_s_per_token=max(0.0, e_fwd / slot_layers) if slot_layers else 0.0,
        expert_bwd_s_per_token=max(0.0, e_bwd / slot_layers) if slot_layers else 0.0,
        optimizer_s_per_param=max(0.0, tail / params) if params else 0.0,
        slowdown_in_a2a=slow_a2a,
        slowdown_in_allreduce=slow_ar,
        straggler=straggler,
    )
    # allreduce: duration = launch + ring steps x hop + busiest-link bytes / (efficiency x rate)
    # ... and, beside compute, its bytes move slower
    ar_samples, ar_weights = (
        [],
        [],
    )  # per run, size and computed share (none, or in quarters): the median, weighted by how many ran
    for r, o in zip(runs, obs):
        line = r.link_bps / 8
        n = r.workers
        groups: dict[tuple[float, float], list[tuple[float, float]]] = {}
        for nbytes, dur, busy in o.allreduce:
            groups.setdefault((nbytes, round(busy * 4) / 4 if busy > 0 else -1.0), []).append((dur, busy))
        sharers = core_sharers(r)
        for (nbytes, _), rows in groups.items():
            dur = median([d for d, _ in rows])
            busy = dur * sum(b for _, b in rows) / len(rows)
            # computed seconds weighed by the other ranks on the core: the fitted slowdown is per such rank
            ar_samples.append((2 * (n - 1), 2 * (n - 1) / n * nbytes / line, dur, busy * sharers))
            ar_weights.append(len(rows))
    ar_slowdown = 0.0
    if ar_samples:
        ar_launch, ar_hop, efficiency, ar_slowdown = fit_allreduce(np.asarray(ar_samples), np.asarray(ar_weights))
    # all-to-all: duration = latency + max(link bytes / (efficiency x rate x pair loss), bytes / (core rate x cores),
    # flow / flow cap); all-to-alls that stay inside hosts: latency + bytes / (loopback rate x cores)
    samples = []  # (busiest-link line seconds, bytes one rank sends, to other hosts, its largest flow to another host,
    #              cores per rank, duration, flows between two hosts)
    loopback = []  # (bytes one rank sends, cores per rank, duration)
    small = []
    for r, o in zip(runs, obs):
        line = r.link_bps / 8
        ep, g = ep_of(r), group_ranks_per_host(r)
        for mean_bytes, dur in o.a2a:
            if mean_bytes < 1024:
                small.append(dur)
                continue
            nbytes = mean_bytes * r.a2a_skew  # the busiest rank's: it ends the all-to-all
            if busiest_link_bytes(r, nbytes) > 0:
                samples.append(
                    (
                        busiest_link_bytes(r, nbytes) / line,
                        nbytes,
                        nbytes * (ep - g) / (ep - 1),
                        nbytes / (ep - 1),
                        r.core_share,
                        dur,
                        g * g,
                    )
                )
            else:
                loopback.append((nbytes, r.core_share, dur))
    if not samples:
        raise LinaError("no uncontended forward all-to-all crossed a host link: cannot fit the link")
    samples = np.asarray(samples)
    if not ar_samples:  # no allreduce to read the link from: the all-to-alls' own line bound, as if no other limit held
        efficiency = float(np.clip(np.median(samples[:, 0] / samples[:, 5]), 0.05, 1.0))
        ar_launch = ar_hop = None
    # with loopback all-to-alls to read their own rate from, the per-core rate counts bytes to other hosts only
    counted = samples[:, 2] if loopback else samples[:, 1]
    link_samples = np.column_stack([samples[:, 0], counted, samples[:, 3:]])
    latency, core_copy, flow_copy, pair_loss, note = fit_a2a(link_samples, small, efficiency)
    loopback_rate = fit_loopback(np.asarray(loopback), latency) if loopback else None
    if ar_launch is None:
        ar_launch, ar_hop = latency, 0.0
    fitted = CalibrationFit(
        profile,
        efficiency,
        latency,
        ar_launch,
        ar_hop,
        INTRA_FACTOR,
        len(samples),
        int(sum(ar_weights)),
        note,
        core_copy,
        flow_copy,
        exponent,
        exponent_no_a2a,
        ar_slowdown,
        loopback_rate,
        pair_loss,
        len(loopback),
        loopback_rate,
    )
    return fit_loopback_to_steps(fitted, runs)


LOOPBACK_MULTIPLIERS = tuple(2.0 ** (k / 2) for k in range(-2, 7))  # around the samples' rate: 0.5x .. 8x


def fit_loopback_to_steps(fitted: CalibrationFit, runs: list[RunRecord]) -> CalibrationFit:
    """The loopback rate that best predicts the step times (least squares of relative errors) of
    the runs whose all-to-alls stay partly inside hosts, searched around the rate the uncontended
    loopback all-to-alls give alone.

    Those samples cannot pin the rate down on shared cores: 1 MB moves in about 1 ms when both
    ranks run and in 10-40 ms when one waits for a core (the waits are core sharing, which the
    compute model charges already), so their least-squares rate follows how many waits a run
    happened to catch (2.6 or 5.3 Gbit/s per core from two sets of the same configurations).
    Searched on a grid of factors of sqrt(2), then refined by a quarter step either side.
    ``fitted`` unchanged when there is no such run or no loopback rate.
    """
    base = fitted.loopback_bytes_per_s
    local = [r for r in runs if ep_of(r) > 1 and group_ranks_per_host(r) > 1]
    if base is None or not local:
        return fitted

    def cost(factor: float) -> float:
        trial = replace(fitted, loopback_bytes_per_s=base * factor)
        return sum(((predict(trial, r).step_s - r.measured_step_s) / r.measured_step_s) ** 2 for r in local)

    costs = {m: cost(m) for m in LOOPBACK_MULTIPLIERS}
    best = min(costs, key=costs.get)
    for m in (best * 2**-0.25, best * 2**0.25):
        costs[m] = cost(m)
    best = min(costs, key=costs.get)
    return replace(fitted, loopback_bytes_per_s=base * best, loopback_step_runs=len(local))

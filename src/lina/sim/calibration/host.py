"""The terms of a calibration that describe a CPU host, not a network or a GPU.

On the emulated cluster every rank is a process on one machine: the ranks share its cores, and
Gloo moves collective bytes through TCP on those cores with two threads per process group. A
GPU scenario has none of this (``ClusterSpec.host`` is ``None``); a calibrated one gets a
:class:`~lina.sim.spec.CpuHostModel` from :func:`host_model`. Here:

- how compute time grows as ranks share cores (:func:`fit_core_exponent`) and a rank's share of
  them (:func:`core_share`), and the fitted costs on such a share (:func:`on_core_share`);
- that a step's compute and loopback copies fit the machine's cores (:func:`within_cores`);
- the host model of a run: per-core copy rates, the per-flow cap, the goodput lost per extra
  flow between two hosts, Gloo's threads (:data:`GLOO_THREADS`), the allreduce's own launch
  cost (:func:`host_model`).
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from lina.sim.calibration.layout import ep_of, group_ranks_per_host
from lina.sim.compute import ComputeProfile
from lina.sim.spec import CpuHostModel

if TYPE_CHECKING:
    from lina.sim.calibration.fitting import CalibrationFit
    from lina.sim.calibration.observations import RunObs
    from lina.sim.calibration.runs import RunRecord
    from lina.sim.train import TrainResult

GLOO_THREADS = 2  # threads of a Gloo process group: asynchronous operations of one rank run two at a time


def core_share(cpu_count: int | None, workers: int) -> float:
    """Cores per rank, at most 1, when ``workers`` ranks share ``cpu_count`` cores (``None``: this machine's)."""
    cores = cpu_count or os.cpu_count() or 1
    return min(1.0, cores / workers)


def core_sharers(run: RunRecord) -> float:
    """Other ranks per core beside a rank of ``run`` (0 when each rank has a core or more)."""
    return max(0.0, 1.0 / run.core_share - 1.0)


def exponent_of(run: RunRecord, with_a2a: float, without: float | None) -> float:
    """The core-sharing exponent for ``run``: ``without`` when its step has no all-to-all."""
    return without if ep_of(run) == 1 and without is not None else with_a2a


def fit_core_exponent(runs: list[RunRecord], obs: list[RunObs]) -> tuple[float, float | None]:
    """How compute time grows as ranks share cores: ``time ~ core_share ** -exponent``, for runs
    with all-to-alls and for runs without (pure data parallelism).

    1 would be a rank running at exactly its share of a core; less, when sharing costs less than
    that (idle moments of one rank are another's compute: all-to-alls pause the ranks in turn;
    with none, ranks sharing cores compute side by side the whole step). Fitted on compute per
    token and layer (log-log least squares, one intercept per token count, since runs with fewer
    tokens pay more per token, and one slope per kind of run) where runs of one token count and
    kind have more than one core share; otherwise 1 (with all-to-alls) or ``None`` (without:
    the exponent of runs with all-to-alls).
    """
    tokens = sorted({r.model.tokens for r in runs})

    def varied(kind: bool) -> bool:
        return any(
            len({r.core_share for r in runs if r.model.tokens == t and (ep_of(r) > 1) == kind}) > 1 for t in tokens
        )

    kinds = [k for k in (True, False) if varied(k)]  # with all-to-alls, without
    if not kinds:
        return 1.0, None
    xs, ys = [], []
    for r, o in zip(runs, obs):
        kind = ep_of(r) > 1
        if kind not in kinds:
            continue
        slopes = [math.log(r.core_share) if kind == k else 0.0 for k in kinds]
        xs.append(slopes + [1.0 if r.model.tokens == t else 0.0 for t in tokens])
        ys.append(math.log(o.compute_s / (r.model.layers * r.model.tokens)))
    coef, *_ = np.linalg.lstsq(np.asarray(xs), np.asarray(ys), rcond=None)
    value = {k: min(1.0, max(0.0, -float(c))) for k, c in zip(kinds, coef)}
    return value.get(True, 1.0), value.get(False)


def host_model(fitted: CalibrationFit, run: RunRecord) -> CpuHostModel:
    """The CPU host of ``run`` as the simulator takes it (``ClusterSpec.host``), from the fit."""
    core = fitted.core_copy_bytes_per_s
    return CpuHostModel(
        rank_copy_gbps=None if core is None else core * run.core_share * 8 / 1e9,
        flow_copy_gbps=None if fitted.flow_copy_bytes_per_s is None else fitted.flow_copy_bytes_per_s * 8 / 1e9,
        copy_intra=fitted.loopback_bytes_per_s is None,
        pair_flow_loss=fitted.pair_flow_loss,
        a2a_in_flight=run.a2a_in_flight,
        allreduce_launch_s=fitted.allreduce_launch_s,
    )


CORE_ROUNDS = 8  # re-simulations that bring a step's compute within its machine's cores


def within_cores(fitted: CalibrationFit, run: RunRecord, result: TrainResult, speed: float) -> float:
    """The compute speed (share of a whole core) at which ``result``'s passes fit the cores.

    The fitted core-sharing exponent gives a rank more than its share of the cores while it
    computes (other ranks are paused in all-to-alls meanwhile), but all ranks together cannot
    use more than the machine has: over the forward and backward passes, a rank's work on a
    whole core plus the core-seconds of its loopback all-to-all copies must fit in the passes
    times its share of the cores. A loopback byte is copied twice, out of the sender and into
    the receiver, each at the fitted loopback rate (timed with both ends copying at once), and a
    rank of a uniform all-to-all receives as many loopback bytes as it sends.
    When it does not (ranks whose all-to-alls stay inside a host wait little and compute side
    by side), compute slows to the speed that makes it fit; otherwise ``speed`` is returned.
    ``speed`` is what ``result`` was simulated at.
    """
    passes = [t for t in result.tasks if t.cat == "compute" and t.args.get("phase") in ("fwd", "bwd")]
    if not passes or run.core_share >= 1.0:
        return speed
    elapsed = max(t.end_s for t in passes) - min(t.start_s for t in result.tasks)
    work = sum(t.duration_s for t in passes) * speed
    copies = 0.0
    ep, g = ep_of(run), group_ranks_per_host(run)
    if fitted.loopback_bytes_per_s and ep > 1 and g > 1:
        sent = sum(
            t.args.get("bytes", 0.0) for t in result.tasks if t.cat == "a2a" and t.args.get("bytes", 0.0) >= 1024
        )
        copies = 2 * sent * (g - 1) / (ep - 1) / fitted.loopback_bytes_per_s
    need = (work + copies) / run.core_share
    return speed if need <= elapsed else speed * elapsed / need


def on_core_share(profile: ComputeProfile, share: float) -> ComputeProfile:
    """``profile`` (costs on one whole core) for a rank that gets ``share`` of a core."""
    costs = (
        "dense_fwd_s_per_token",
        "dense_bwd_s_per_token",
        "expert_fwd_s_per_token",
        "expert_bwd_s_per_token",
        "expert_min_s",
        "head_fwd_s_per_token",
        "head_bwd_s_per_token",
        "optimizer_s_per_param",
    )
    return replace(profile, **{name: getattr(profile, name) / share for name in costs})

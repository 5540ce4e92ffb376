"""Predicting a measured run's step with fitted parameters."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from lina.policy import train_policy
from lina.sim.calibration.host import CORE_ROUNDS, within_cores
from lina.sim.calibration.layout import ep_of
from lina.sim.train import TrainResult, simulate_step

if TYPE_CHECKING:
    from lina.sim.calibration.fitting import CalibrationFit
    from lina.sim.calibration.runs import RunRecord


def predict(fitted: CalibrationFit, run: RunRecord) -> TrainResult:
    """Simulate one step of ``run`` with the fitted parameters.

    Lina's allreduce micro-ops run one at a time, as the trainer runs them during backward. After
    backward the trainer lets four run at once, but over Gloo they move no more per second than
    one does (after backward, the 4x1 pure data-parallel run sent about 40 MB/s per rank with
    four in flight; one 286 KB allreduce at a time sends about 47 MB/s in the 4x1 sequential
    run), so running them one at a time is the closer model.

    The ranks share one machine's cores, so their compute cannot take more core-seconds than the
    machine has: see :func:`within_cores`.
    """
    policy = train_policy(run.policy)
    if policy.packing:  # the run records the packing its controller chose: simulate that layout
        policy = replace(policy, packing=False)
    train = replace(run.train, ep_size=ep_of(run))
    cluster = fitted.cluster_for(run)
    speed = run.core_share ** fitted.exponent_for(run)
    result = simulate_step(cluster, run.model, fitted.profile_at(run, speed), train, policy)
    if run.device_mode:  # device time: no cores to fit the compute into
        return result
    for _ in range(CORE_ROUNDS):
        slower = within_cores(fitted, run, result, speed)
        if slower >= speed * (1 - 1e-3):
            break
        speed = slower
        result = simulate_step(cluster, run.model, fitted.profile_at(run, speed), train, policy)
    return result

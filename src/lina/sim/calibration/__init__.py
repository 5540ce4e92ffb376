"""Fit the simulator to measured runs, then predict those runs: ``lina sim --calibrate``.

A *run folder* holds ``summary.json`` and ``timeline-rank{R}.jsonl`` (:mod:`lina.obs.schema`,
either version). The package, in the order a calibration runs:

- :mod:`~lina.sim.calibration.runs`: read run folders into :class:`RunRecord` (what ran, the
  measured median step, the spans by rank; the routing skew read from the spans, an input like
  a routing trace: :func:`lina.sim.a2a_skew.a2a_skew`);
- :mod:`~lina.sim.calibration.observations`: timelines to observations (per-step compute, uncontended
  collectives timed from the last rank's arrival to the last exit);
- :mod:`~lina.sim.calibration.fitting` and :mod:`~lina.sim.calibration.links`: the fitted compute
  profile, contention and network parameters;
- :mod:`~lina.sim.calibration.host`: the terms that describe the CPU host of the emulated cluster
  (core sharing, per-core copy rates, Gloo's threads), which a GPU scenario never sees;
- :mod:`~lina.sim.calibration.prediction`: simulate each run with the fit;
- :mod:`~lina.sim.calibration.report`: :func:`calibrate` (fit and predict), the text and JSON report.

Synthetic run folders with known parameters (for tests): :mod:`lina.testing.calibration`.
"""

from lina.sim.calibration.fitting import CalibrationFit, fit, fit_loopback_to_steps, fit_per_layer, fit_slowdowns
from lina.sim.calibration.host import GLOO_THREADS, fit_core_exponent, on_core_share, within_cores
from lina.sim.calibration.observations import RunObs, StepObs, observe
from lina.sim.calibration.prediction import predict
from lina.sim.calibration.report import CalibrationReport, calibrate, report_text, write_report
from lina.sim.calibration.runs import RunRecord, find_runs, read_run

__all__ = [
    "CalibrationFit",
    "CalibrationReport",
    "GLOO_THREADS",
    "RunObs",
    "RunRecord",
    "StepObs",
    "calibrate",
    "find_runs",
    "fit",
    "fit_core_exponent",
    "fit_loopback_to_steps",
    "fit_per_layer",
    "fit_slowdowns",
    "observe",
    "on_core_share",
    "predict",
    "read_run",
    "report_text",
    "within_cores",
    "write_report",
]

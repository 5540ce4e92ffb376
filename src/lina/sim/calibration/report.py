"""The calibration as a whole: fit to run folders, predict them (and held-out runs), and the
report (text and JSON)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from lina.sim.calibration.fitting import CalibrationFit, fit
from lina.sim.calibration.host import GLOO_THREADS
from lina.sim.calibration.prediction import predict
from lina.sim.calibration.runs import RunRecord, find_runs
from lina.sim.repeats import pooled_rows, step_times


@dataclass
class CalibrationReport:
    fit: CalibrationFit
    rows: list[dict]
    holdout_rows: list[dict] = field(default_factory=list)  # runs predicted but never fitted
    config_rows: list[dict] = field(
        default_factory=list
    )  # the fitted runs per configuration and policy (see lina.sim.repeats)

    @property
    def median_abs_error(self) -> float:
        return statistics.median(abs(r["error"]) for r in self.rows)

    @property
    def config_median_abs_error(self) -> float | None:
        return statistics.median(abs(r["error"]) for r in self.config_rows) if self.config_rows else None

    @property
    def holdout_median_abs_error(self) -> float | None:
        return statistics.median(abs(r["error"]) for r in self.holdout_rows) if self.holdout_rows else None

    def to_dict(self) -> dict:
        """JSON-ready: the fit, every run's row, the error medians (and, from :func:`write_report`, provenance)."""
        return {
            "fit": self.fit.to_dict(),
            "rows": self.rows,
            "median_abs_error": self.median_abs_error,
            "holdout_rows": self.holdout_rows,
            "holdout_median_abs_error": self.holdout_median_abs_error,
            "config_rows": self.config_rows,
            "config_median_abs_error": self.config_median_abs_error,
        }


def _rows(fitted: CalibrationFit, runs: list[RunRecord]) -> list[dict]:
    rows = []
    for r in runs:
        pred = predict(fitted, r).step_s
        rows.append(
            {
                "run": str(r.path),
                "config": r.label,
                "policy": r.policy,
                "measured_s": r.measured_step_s,
                "predicted_s": pred,
                "error": (pred - r.measured_step_s) / r.measured_step_s,
                "a2a_skew": r.a2a_skew,
                "device_mode": r.device_mode,
                "compute": f"{r.device} time x {r.dilation:g}" if r.device_mode else "real",
            }
        )
    return rows


def calibrate(root: str | Path | list, holdout: str | Path | None = None) -> CalibrationReport:
    """Fit to the runs under ``root`` (a folder or a list of folders) and predict them; with
    ``holdout``, predict its runs too (with the same fit: they test the model on runs it was
    not fitted to)."""
    roots = root if isinstance(root, (list, tuple)) else [root]
    runs = [r for folder in roots for r in find_runs(folder)]
    held = find_runs(holdout) if holdout is not None else []
    fitted = fit(runs)
    rows = _rows(fitted, runs)
    return CalibrationReport(fitted, rows, _rows(fitted, held), pooled_rows(rows, [step_times(r.spans) for r in runs]))


def _rate(bytes_per_s: float | None, per: str) -> str:
    if bytes_per_s is None:
        return "without a limit of its own"
    return f"at most {bytes_per_s * 8 / 1e6:.0f} Mbit/s" + (f" {per}" if per else "")


def report_text(rep: CalibrationReport) -> str:
    f = rep.fit
    p = f.profile
    lines = [
        "fitted parameters:",
        f"  links carry {f.link_efficiency:.3f} of their configured rate; an allreduce costs "
        f"{f.allreduce_launch_s * 1e3:.3f} ms "
        f"+ {f.allreduce_hop_s * 1e3:.3f} ms per ring step ({f.allreduce_samples} uncontended allreduces); "
        f"an allreduce loses {f.allreduce_slowdown_per_sharer:.0%} of its speed while its ranks compute, per "
        "other rank on their core",
        f"  all-to-all: latency {f.a2a_latency_s * 1e3:.3f} ms; a rank sends "
        f"{_rate(f.core_copy_bytes_per_s, 'per core it has')}; "
        f"one flow to another host moves {_rate(f.flow_copy_bytes_per_s, '')}"
        f"{f'; the link loses {f.pair_flow_loss:.0%} of its goodput per extra flow between the same two hosts' if f.pair_flow_loss else ''} "
        f"({f.a2a_samples} uncontended forward all-to-alls, timed from the last rank's arrival); "
        f"{GLOO_THREADS} operations of a rank in flight at once (Gloo's threads), the earlier served first",
        (
            f"  all-to-alls inside a host (loopback): a rank sends {_rate(f.loopback_bytes_per_s, 'per core it has')} "
            + (
                f"(fitted to the step times of the {f.loopback_step_runs} runs with all-to-alls inside hosts; their "
                f"{f.loopback_samples} uncontended loopback all-to-alls alone give "
                f"{_rate(f.loopback_sampled_bytes_per_s, '')}, "
                f"swayed by waits for a core; "
                if f.loopback_step_runs
                else f"({f.loopback_samples} uncontended ones; "
            )
            + "the per-core limit above counts bytes to other hosts only); "
            "they lose the allreduce's share of speed beside compute, and their copies take the compute's cores"
            if f.loopback_bytes_per_s
            else f"  intra-host rate {f.intra_factor:.1f}x the host link (assumed; inside a host the "
            "per-core limit binds first)"
        ),
        "  compute per token on one whole core (a run's ranks share its machine's cores): dense fwd "
        f"{p.dense_fwd_s_per_token * 1e6:.3f} us, bwd {p.dense_bwd_s_per_token * 1e6:.3f} us per layer; "
        f"{f'plus {p.layer_fwd_s * 1e3:.3f} ms fwd, {p.layer_bwd_s * 1e3:.3f} ms bwd per layer whatever the tokens; ' if p.layer_fwd_s or p.layer_bwd_s else ''}"
        f"expert fwd {p.expert_fwd_s_per_token * 1e6:.3f} us, bwd {p.expert_bwd_s_per_token * 1e6:.3f} "
        "us per routed token; "
        f"optimizer {p.optimizer_s_per_param * 1e9:.3f} ns per parameter",
        f"  compute time grows as (cores per rank) ** -{f.core_exponent:.2f} when ranks share cores"
        + (
            f" (** -{f.core_exponent_no_a2a:.2f} in steps without all-to-all)"
            if f.core_exponent_no_a2a is not None
            else ""
        ),
        f"  compute speed lost while an all-to-all is in flight {p.slowdown_in_a2a:.1%}, while an allreduce is "
        f"{p.slowdown_in_allreduce:.1%} "
        f"(collectives share the compute's CPU cores); the last rank to reach an all-to-all computes {p.straggler:.1%} "
        "longer than the mean",
        *([f"  note: {f.note}"] if f.note else []),
        *_skew_line(rep.rows),
        "",
        f"  {'config':<52}{'policy':<12}{'skew':>6}{'measured ms':>12}{'predicted ms':>14}{'error':>9}",
    ]
    lines += _table(rep.rows)
    lines.append(
        f"median |error|: {rep.median_abs_error:.1%} over {len(rep.rows)} runs; "
        f"{_within(rep.rows)} of {len(rep.rows)} within 10%"
    )
    lines += _per_config_lines(rep.rows)
    repeated = [r for r in rep.config_rows if r["runs"] > 1]
    if repeated:
        lines += [
            "",
            f"per configuration and policy ({len(repeated)} measured more than once, each pooled: the median of "
            "all its runs' steps):",
            f"  {'config':<52}{'policy':<12}{'runs ms':>16}{'pooled ms':>11}{'predicted ms':>14}{'error':>9}",
        ]
        for r in repeated:
            runs_ms = ", ".join(f"{m * 1e3:.0f}" for m in r["run_medians_s"])
            lines.append(
                f"  {r['config'][:51]:<52}{r['policy']:<12}{runs_ms:>16}{r['measured_s'] * 1e3:>11.1f}"
                f"{r['predicted_s'] * 1e3:>14.1f}{r['error']:>+9.1%}"
            )
        lines.append(
            f"median |error| per configuration: {rep.config_median_abs_error:.1%} over "
            f"{len(rep.config_rows)} configurations; "
            f"{_within(rep.config_rows)} of {len(rep.config_rows)} within 10%"
        )
    if rep.holdout_rows:
        lines += ["", "held-out runs (predicted with the parameters above, never fitted to):"] + _table(
            rep.holdout_rows
        )
        lines.append(
            f"held-out median |error|: {rep.holdout_median_abs_error:.1%} over {len(rep.holdout_rows)} runs; "
            f"{_within(rep.holdout_rows)} of {len(rep.holdout_rows)} within 10%"
        )
    return "\n".join(lines)


def _per_config_lines(rows: list[dict]) -> list[str]:
    """Median |error| of each configuration's runs, and its compute mode: a device-time run's
    prediction has no CPU host term (compute is the device model; only network terms apply)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["config"], []).append(r)
    device = [r for r in rows if r.get("device_mode")]
    lines = [
        "",
        f"device-mode runs: {len(device)} of {len(rows)}"
        + (" (predicted with no CPU host model: links shared per connection, no core sharing)" if device else ""),
        "per configuration: median |error| of its runs",
    ]
    for config, group in groups.items():
        modes = sorted({r.get("compute", "real") for r in group})
        err = statistics.median(abs(r["error"]) for r in group)
        lines.append(f"  {config[:51]:<52}{len(group):>3} run(s)  {err:>6.1%}  compute {', '.join(modes)}")
    return lines


def _skew_line(rows: list[dict]) -> list[str]:
    skews = [r.get("a2a_skew", 1.0) for r in rows]
    if not skews or max(skews) <= 1.0:
        return []
    return [
        "  routing (an input, not fitted): each run's all-to-all skew (column 'skew': the busiest rank's bytes, "
        "or host's where the "
        f"group's ranks share host links, over the mean rank's) is read from its timelines: {min(skews):.2f} "
        f"to {max(skews):.2f}; "
        "the simulated all-to-alls move the busiest's bytes"
    ]


def _table(rows: list[dict]) -> list[str]:
    return [
        f"  {r['config'][:51]:<52}{r['policy']:<12}{r.get('a2a_skew', 1.0):>6.2f}{r['measured_s'] * 1e3:>12.1f}"
        f"{r['predicted_s'] * 1e3:>14.1f}{r['error']:>+9.1%}"
        for r in rows
    ]


def _within(rows: list[dict], bound: float = 0.10) -> int:
    return sum(abs(r["error"]) <= bound for r in rows)


def write_report(rep: CalibrationReport, path: str | Path) -> Path:
    """Write ``rep`` as JSON (with :func:`lina.obs.provenance.provenance`) and its plot beside it.

    Returns:
        The plot's path.
    """
    import json

    from lina.obs.provenance import provenance
    from lina.sim.plots import plot_calibration

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**rep.to_dict(), "provenance": provenance()}, indent=2) + "\n")
    return plot_calibration(rep.rows, rep.holdout_rows, path.with_suffix(".png"), rep.config_rows)

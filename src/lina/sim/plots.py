"""PNG plots of simulated results (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter  # noqa: E402

from lina.policy import BASELINE_POLICY  # noqa: E402
from lina.sim.runner import ScenarioRun  # noqa: E402

AXIS_LABEL = {"gpus": "GPUs", "link": "NIC link rate (Gb/s)"}


def plot_sweep(runs: list[ScenarioRun], axis: str, values: list[float], path: str | Path, title: str) -> Path:
    """Speedup over ddp-overlap of every policy against the swept value; a2a share on a second panel."""
    path = Path(path)
    policies = [p for p in runs[0].results if p != BASELINE_POLICY]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for p in policies:
        ys = [r.results[p].speedup for r in runs]
        ax.plot(values, ys, marker="o", label=p)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(AXIS_LABEL[axis])
    ax.set_ylabel("step-time speedup vs ddp-overlap")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax2.plot(
        values, [r.baseline.a2a_share * 100 for r in runs], marker="s", color="tab:red", label="ddp-overlap a2a share"
    )
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel(AXIS_LABEL[axis])
    ax2.set_ylabel("all-to-all share of ddp-overlap step (%)")
    ax2.set_ylim(0, 100)
    ax2.grid(alpha=0.3)
    ax2.set_title("regime")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_breakdown(run: ScenarioRun, path: str | Path) -> Path:
    """Per policy: step time split into compute and exposed communication, a2a time beside it."""
    path = Path(path)
    names = list(run.results)
    compute = [run.results[n].compute_s * 1e3 for n in names]
    exposed = [run.results[n].exposed_comm_s * 1e3 for n in names]
    a2a = [run.results[n].a2a_s * 1e3 for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], compute, 0.4, label="compute")
    ax.bar([x - 0.2 for x in xs], exposed, 0.4, bottom=compute, label="exposed communication")
    ax.bar([x + 0.2 for x in xs], a2a, 0.4, label="all-to-all (in flight)", color="tab:red", alpha=0.6)
    ax.axhline(run.lower_bound.step_s * 1e3, color="k", ls=":", lw=1, label="lower bound (synchronous schedule)")
    ax.set_xticks(list(xs), names, rotation=20, fontsize=8)
    ax.set_ylabel("ms per training step")
    ax.set_title(f"{run.scenario.name} (simulated)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


NICE_TICKS = (1, 2, 3, 5, 7)  # mantissas of the labelled ticks on a log axis


def _plain_log_ticks(axis, low: float, high: float) -> None:
    """Label a log axis with plain numbers (300, 500, 1000, ...) instead of powers of ten."""
    ticks = [
        m * 10**e for e in range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1) for m in NICE_TICKS
    ]
    axis.set_major_locator(FixedLocator([t for t in ticks if low <= t <= high]))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_calibration(
    rows: list[dict], holdout_rows: list[dict], path: str | Path, config_rows: list[dict] | None = None
) -> Path:
    """Predicted against measured step time of every calibration row (held-out rows apart), on log
    axes with the diagonal and a 10% band, and beside it each row's error against its measured
    step; configurations measured more than once (``config_rows`` with ``runs`` > 1) get a line
    from their lowest to their highest run median, at their prediction."""
    path = Path(path)
    fig, (ax, err) = plt.subplots(1, 2, figsize=(11.0, 5.0))
    everything = rows + holdout_rows
    values = [v for r in everything for v in (r["measured_s"], r["predicted_s"])]
    low, top = min(values) * 0.8e3, max(values) * 1.25e3
    line = np.geomspace(low, top, 50)
    ax.plot(line, line, color="k", lw=0.8)
    ax.fill_between(line, line * 0.9, line * 1.1, color="grey", alpha=0.15, label="within 10%")
    err.axhspan(-10, 10, color="grey", alpha=0.15, label="within 10%")
    err.axhline(0, color="k", lw=0.8)
    for group, marker, label in ((rows, "o", "fitted runs"), (holdout_rows, "^", "held-out runs")):
        if group:
            measured = [r["measured_s"] * 1e3 for r in group]
            ax.scatter(measured, [r["predicted_s"] * 1e3 for r in group], marker=marker, s=22, label=label)
            err.scatter(measured, [r["error"] * 100 for r in group], marker=marker, s=22, label=label)
    repeated = [r for r in config_rows or [] if r["runs"] > 1]
    for i, r in enumerate(repeated):
        ax.hlines(
            r["predicted_s"] * 1e3,
            min(r["run_medians_s"]) * 1e3,
            max(r["run_medians_s"]) * 1e3,
            color="tab:green",
            lw=1.2,
            label="runs of one configuration" if i == 0 else None,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low, top)
    ax.set_ylim(low, top)
    ax.set_xlabel("measured median step (ms, emulated cluster)")
    ax.set_ylabel("simulated step (ms)")
    ax.set_title("simulator calibration")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    err.set_xscale("log")
    err.set_xlim(low, top)
    _plain_log_ticks(ax.xaxis, low, top)
    _plain_log_ticks(ax.yaxis, low, top)
    _plain_log_ticks(err.xaxis, low, top)
    err.set_xlabel("measured median step (ms, emulated cluster)")
    err.set_ylabel("error of the simulated step (%)")
    err.set_title("error per run")
    err.legend(fontsize=8, loc="lower right")
    err.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

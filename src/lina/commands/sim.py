"""``lina sim``: what Lina gives on a cluster you cannot run here, by simulation.

lina sim --list
lina sim --scenario NAME [--json FILE] [--policies a,b,..]
lina sim --config FILE.toml [--json FILE]
lina sim --sweep gpus|link --scenario NAME --out DIR
lina sim --calibrate DIR [DIR ...] [--holdout DIR2] [--json FILE]
lina sim --bench
lina sim --contention docs/results/contention.json [--json FILE]
lina sim --scenario paper-testbed --fairness flow
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from lina.errors import ConfigError, LinaError
from lina.extras import can_plot
from lina.obs.provenance import provenance
from lina.policy import BASELINE_POLICY, TRAIN_POLICIES
from lina.sim import scenarios
from lina.sim.spec import FAIRNESS_MODES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sim",
        help="simulate training steps / inference batches on clusters of up to 1024+ GPUs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="list built-in scenarios (name, GPUs, description)")
    what.add_argument(
        "--calibrate",
        metavar="DIR",
        nargs="+",
        help="fit compute/link parameters to the emulated-cluster runs in DIR(s) and predict them",
    )
    what.add_argument("--bench", action="store_true", help="time the simulator on the 1024-GPU, 64-layer scenario")
    what.add_argument(
        "--contention",
        metavar="FILE",
        help="simulate a `lina bench contention` JSON's scenario under each link-sharing mode, beside its measured "
        "median slowdown",
    )
    p.add_argument(
        "--fairness",
        choices=FAIRNESS_MODES,
        help="link sharing of the training scenarios' clusters: collective (each collective an equal share of a "
        "NIC) or flow (each connection an equal share, what the emulated links measure); default: the scenario's",
    )
    p.add_argument("--scenario", metavar="NAME", help="built-in scenario or suite (see --list)")
    p.add_argument("--config", metavar="FILE", help="scenario from a TOML file")
    p.add_argument("--policies", metavar="LIST", help=f"comma-separated policies (known: {', '.join(TRAIN_POLICIES)})")
    p.add_argument(
        "--holdout", metavar="DIR", help="with --calibrate: also predict the runs in DIR, which the fit never sees"
    )
    p.add_argument("--json", metavar="FILE", help="write results as JSON (and a PNG beside it)")
    p.add_argument("--sweep", choices=("gpus", "link"), help="vary GPU count or link rate; needs --out")
    p.add_argument("--values", metavar="LIST", help="comma-separated sweep values (GPUs, or Gb/s)")
    p.add_argument("--out", metavar="DIR", help="directory for sweep JSON and PNG")
    p.add_argument("--trace", metavar="FILE", help="write the simulated steps as a Chrome trace (one scenario)")
    p.add_argument("--routing", metavar="FILE", help="routing trace for inference scenarios (JSONL)")
    p.set_defaults(func=run)


def _write_json(path: str | Path, data, stamp: bool = True) -> Path:
    """Write ``data`` as JSON; a result (a dict, ``stamp``) gets ``"provenance"``."""
    if stamp and isinstance(data, dict):
        data = {**data, "provenance": provenance()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    return path


def _load_scenario(args):
    from lina.sim.scenario import load_toml

    if args.config:
        sc = load_toml(args.config)
    elif args.scenario:
        sc = scenarios.get(args.scenario)
    else:
        raise ConfigError("--scenario", "no scenario given", "pass --scenario NAME (see --list) or --config FILE.toml")
    if args.policies:
        sc = sc.with_policies(tuple(p.strip() for p in args.policies.split(",") if p.strip()))
    return _with_fairness(sc, args.fairness)


def _with_fairness(sc, fairness: str | None):
    """``sc`` with its cluster's link sharing set to ``fairness`` (unchanged when None)."""
    if fairness is None:
        return sc
    return dataclasses.replace(sc, cluster=dataclasses.replace(sc.cluster, fairness=fairness))


def _contention(path: str, json_path: str | None) -> int:
    """``lina sim --contention FILE``: a measured contention run beside the simulator's link sharing."""
    from lina.sim.contention import compare, report_lines

    try:
        measured = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(
            "--contention", f"cannot read {path}: {err}", "give a `lina bench contention --json` file"
        ) from err
    result = compare(measured)
    print("\n".join(report_lines(result)))
    if json_path:
        print(f"wrote {_write_json(json_path, {'source': path, **result})}")
    return 0


def _list() -> int:
    from lina.sim import infer_scenarios

    rows = scenarios.listing() + infer_scenarios.listing()
    width = max(len(r[0]) for r in rows) + 2
    for name, gpus, desc in rows:
        print(f"{name:<{width}}{gpus:>9}  {desc}")
    return 0


def _run_suite(args) -> int:
    from lina.sim import infer_scenarios
    from lina.sim.report import summary_table, testbed_summary, train_table
    from lina.sim.runner import run_scenario

    suite = scenarios.SUITES[args.scenario]
    runs = []
    for i, name in enumerate(suite.members, 1):
        sc = _with_fairness(scenarios.get(name), args.fairness)
        if args.policies:
            sc = sc.with_policies(tuple(p.strip() for p in args.policies.split(",")))
        elif "lina-priority" not in sc.policies:
            sc = sc.with_policies(sc.policies + ("lina-priority", "lina-partition"))
        print(f"[{i}/{len(suite.members)}] {name}", flush=True)
        runs.append(run_scenario(sc, progress=lambda line: print(line, flush=True)))
    print()
    for r in runs:
        print(train_table(r))
        print()
    rows = testbed_summary(runs)
    infer_rows = infer_scenarios.testbed_inference_rows(
        progress=lambda line: print(line, flush=True), routing=args.routing
    )
    rows += infer_rows
    print(
        summary_table(
            rows, f"{suite.name}: simulated (ours) beside the paper's reported numbers (the paper's, labelled)"
        )
    )
    if args.json:
        path = _write_json(args.json, {"suite": suite.name, "summary": rows, "runs": [r.to_dict() for r in runs]})
        print(f"wrote {path}")
    return 0


def _run_one(args) -> int:
    from lina.sim import infer_scenarios
    from lina.sim.report import train_table
    from lina.sim.runner import run_scenario

    if args.scenario and infer_scenarios.is_inference(args.scenario):
        return infer_scenarios.run_command(args)
    sc = _load_scenario(args)
    print(f"simulating {sc.name} ({sc.gpus} GPUs), policies: {', '.join(sc.policies)}", flush=True)
    run = run_scenario(sc, progress=lambda line: print(line, flush=True))
    print()
    print(train_table(run))
    if args.trace:
        from lina.obs.chrome_trace import to_chrome_trace

        spans = []
        for rank, r in enumerate(run.results.values()):
            spans += r.timeline(rank=rank).spans()
        path = _write_json(args.trace, to_chrome_trace(spans), stamp=False)
        print(f"wrote {path} (one process per policy)")
    if args.json:
        path = _write_json(args.json, run.to_dict())
        print(f"wrote {path}")
        if can_plot(Path(args.json).with_suffix(".png")):
            from lina.sim.plots import plot_breakdown

            print(f"wrote {plot_breakdown(run, Path(args.json).with_suffix('.png'))}")
    return 0


def _sweep(args) -> int:
    from lina.sim.runner import default_sweep_values, sweep

    if not args.out:
        raise ConfigError("--out", "a sweep needs an output directory", "add --out DIR")
    if args.scenario in scenarios.SUITES:
        raise ConfigError("--scenario", f"{args.scenario} is a suite", "sweep one scenario, e.g. testbed-gpt2-e16")
    sc = _load_scenario(args)
    if args.values:
        try:
            values = [float(v) for v in args.values.split(",")]
        except ValueError as err:
            raise ConfigError(
                "--values", f"{args.values!r} is not a list of numbers", "write e.g. --values 16,64,256"
            ) from err
    else:
        values = default_sweep_values(sc, args.sweep)
    if args.sweep == "gpus":
        g = sc.cluster.gpus_per_host
        bad = [v for v in values if v < g or int(v) % g]
        if bad:
            raise ConfigError(
                "--values", f"{bad[0]:g} GPUs is not a whole number of {g}-GPU hosts", f"use multiples of {g}"
            )
    runs = sweep(sc, args.sweep, values, progress=lambda line: print(line, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print()
    label = "GPUs" if args.sweep == "gpus" else "Gb/s"
    policies = [p for p in runs[0].results if p != BASELINE_POLICY]
    print(f"{label:>8}{'a2a %':>8}" + "".join(f"{p:>15}" for p in policies))
    for v, r in zip(values, runs):
        print(f"{v:>8g}{r.baseline.a2a_share:>8.1%}" + "".join(f"{r.results[p].speedup:>14.2f}x" for p in policies))
    stem = f"sweep-{args.sweep}-{sc.name}"
    path = _write_json(
        out / f"{stem}.json",
        {"scenario": sc.name, "axis": args.sweep, "values": values, "runs": [r.to_dict() for r in runs]},
    )
    print(f"wrote {path}")
    if can_plot(out / f"{stem}.png"):
        from lina.sim.plots import plot_sweep

        print(f"wrote {plot_sweep(runs, args.sweep, values, out / f'{stem}.png', f'{sc.name}: speedup vs {label}')}")
    return 0


def _bench(args) -> int:
    from lina.sim.train import simulate_step

    sc = scenarios.get(args.scenario or "scale-1024-64l")
    print(f"scale benchmark: {sc.name}: {sc.cluster.describe()} ({sc.gpus} GPUs), {sc.model.describe()}", flush=True)
    profile = sc.compute_profile()
    rows = []
    for policy in sc.policies:
        started = time.perf_counter()
        r = simulate_step(
            sc.cluster, sc.model, profile, sc.train, policy, memory_gb=sc.device.mem_gb if sc.device else None
        )
        wall = time.perf_counter() - started
        rows.append({"policy": policy, "wall_s": wall, "events": r.events, "simulated_step_s": r.step_s})
        print(
            f"  {policy:<14} one step simulated in {wall:6.2f} s wall ({r.events} events); simulated step "
            f"{r.step_s * 1e3:.1f} ms",
            flush=True,
        )
    worst = max(r["wall_s"] for r in rows)
    print(f"slowest policy: {worst:.2f} s wall per simulated step (target < 10 s)")
    if args.json:
        result = {"scenario": sc.name, "gpus": sc.gpus, "layers": sc.model.layers, "rows": rows}
        print(f"wrote {_write_json(args.json, result)}")
    return 0 if worst < 10 else 1


def run(args) -> int:
    import torch

    # The simulator is single-threaded; torch's intra-op threads only fight over the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _dispatch(args)
    finally:
        torch.set_num_threads(threads)


def _calibrate(roots: list[str], json_path: str | None, holdout: str | None) -> int:
    """``lina sim --calibrate DIR [DIR ...] [--holdout DIR2] [--json FILE]``."""
    from lina.sim.calibration import calibrate, report_text, write_report

    held = f"; holding out the runs under {holdout}" if holdout else ""
    print(f"calibrating against the runs under {', '.join(roots)}{held}", flush=True)
    rep = calibrate(roots, holdout)
    print(report_text(rep))
    if json_path:
        png = write_report(rep, json_path)
        print(f"wrote {json_path} and {png}")
    return 0


def _dispatch(args) -> int:
    if args.holdout and not args.calibrate:
        raise ConfigError(
            "--holdout", "needs --calibrate DIR (the runs to fit)", "add --calibrate DIR, or drop --holdout"
        )
    if args.list:
        return _list()
    if args.calibrate:
        return _calibrate(args.calibrate, args.json, args.holdout)
    if args.bench:
        return _bench(args)
    if args.contention:
        return _contention(args.contention, args.json)
    if args.sweep:
        return _sweep(args)
    if args.scenario in scenarios.SUITES:
        return _run_suite(args)
    if not args.scenario and not args.config:
        raise LinaError(
            "say what to simulate: --list, --scenario NAME, --config FILE.toml, --sweep, --calibrate DIR or --bench"
        )
    return _run_one(args)

"""``lina analyze trace FILE``: skew, inter-layer affinity, estimator accuracy and placement balance of a
routing trace."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lina.errors import ConfigError, LinaError
from lina.obs.provenance import provenance


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="analyze recorded runs (routing traces)",
        description="Analyze what Lina works from: routing traces of an MoE model.",
    )
    inner = parser.add_subparsers(dest="analyze_what", metavar="WHAT")
    trace = inner.add_parser(
        "trace",
        help="popularity skew, inter-layer affinity, estimator accuracy and placement balance of a routing trace",
        description=(
            "Measure a routing trace (.npz written by lina, or a vLLM .jsonl routing log such as "
            "../shared/data/mixtral-8x7b-gsm8k-routing.jsonl): per-layer popularity skew, the share of "
            "tokens that keep sharing an expert, estimator accuracy by path length on held-out splits, "
            "and how evenly static / EPLB / Lina / oracle placements spread the held-out batches."
        ),
    )
    trace.add_argument("file", type=Path, help="routing trace (.npz) or vLLM routing log (.jsonl)")
    trace.add_argument(
        "--json", type=Path, default=None, help="write the results as JSON here (default: DIR/analysis.json with --out)"
    )
    trace.add_argument("--out", type=Path, default=None, help="directory for the PNG plots and analysis.json")
    trace.add_argument(
        "--path-lens", type=_int_list, default=[1, 2, 3, 4, 5, 6], help="path lengths to compare (default 1,2,3,4,5,6)"
    )
    trace.add_argument(
        "--batch-tokens", type=int, default=16, help="tokens per served batch in the replay (default 16)"
    )
    trace.add_argument(
        "--devices", type=_int_list, default=[4, 8], help="device counts for the placement replay (default 4,8)"
    )
    trace.add_argument(
        "--balance-path-len",
        type=int,
        default=3,
        help="path length of the estimators in the placement replay (default 3)",
    )
    trace.add_argument(
        "--estimators",
        default="path,path-smoothed,online-path,logistic",
        help="comma-separated estimators to compare: path (the paper's), path-smoothed, online-path, logistic",
    )
    trace.add_argument("--save-trace", type=Path, default=None, help="also write the trace as a lina .npz trace here")
    trace.add_argument(
        "--save-estimator",
        type=Path,
        default=None,
        metavar="OUT.npz",
        help="fit an estimator (--estimator) on the whole trace and write it here, for `lina generate "
        "--estimator OUT.npz`; the analysis is then skipped unless --json or --out asks for it",
    )
    trace.add_argument(
        "--estimator",
        choices=SAVABLE_ESTIMATORS,
        default="path",
        help="with --save-estimator: path (the paper's table), decode (the path mixed with the previous "
        "token's expert at the same layer; needs consecutive tokens of each sequence) or logistic (default path)",
    )
    trace.add_argument(
        "--estimator-path-len",
        type=int,
        default=3,
        help="with --save-estimator: layers of history the estimator uses (default 3; at most layers - 1)",
    )
    trace.set_defaults(func=run_trace)
    parser.set_defaults(func=lambda _args: parser.print_help() or 2)


#: estimators ``--save-estimator`` fits
SAVABLE_ESTIMATORS = ("path", "decode", "logistic")


def fit_estimator(trace, kind: str, path_len: int):
    """The ``kind`` estimator (one of :data:`SAVABLE_ESTIMATORS`) fitted on all of ``trace``."""
    from lina.placement.estimators import DecodeAwareEstimator, LogisticEstimator, PathEstimator

    path_len = max(1, min(path_len, trace.num_layers - 1))
    if kind == "logistic":
        return LogisticEstimator(path_len).fit(trace)
    path = PathEstimator(path_len).fit(trace)
    return DecodeAwareEstimator(path).fit(trace) if kind == "decode" else path


def _summary(result: dict) -> list[str]:
    t = result["trace"]
    skew, aff = result["skew"], result["affinity"]
    lines = [
        f"trace: {t['source']}: {t['tokens']} tokens, {t['sequences']} sequences, {t['layers']} layers, "
        f"{t['experts']} experts, top-{t['top_k']}",
        f"skew: median layer most/least top-1 picks {skew['median_max_min_ratio']}, mean CV {skew['mean_cv']:.3f}"
        + (
            f" ({skew['layers_with_unpicked_expert']} layers have an expert never picked top-1)"
            if skew["layers_with_unpicked_expert"]
            else ""
        ),
        f"affinity: tokens sharing an expert share its top-1 next expert {aff['mean_top1']:.1%} "
        f"(top-2 {aff['mean_top2']:.1%}); popularity alone explains {aff['mean_baseline_top1']:.1%} / "
        f"{aff['mean_baseline_top2']:.1%} "
        f"(paper: 41.94% / 54.59%)",
    ]
    k = t["top_k"]
    for split, acc in result["accuracy"].items():
        mark = " (headline)" if split == result["headline_split"] else ""
        lines.append(
            f"accuracy, split {split}{mark}: fit {acc['fit_tokens']} / test {acc['test_tokens']} tokens, "
            f"layers {acc['layers'][0]}..{acc['layers'][-1]}; token top-{k} set | top-1 | batch top-{2 * k}:"
        )
        names = [n for n in acc if isinstance(acc[n], dict)]
        for name in names:
            cells = "  ".join(
                f"l={l}: {acc[name][str(l)]['token_topk']:.3f}|{acc[name][str(l)]['token_top1']:.3f}|"
                f"{acc[name][str(l)]['batch_match']:.2f}"
                for l in acc["path_lens"]
            )
            lines.append(f"  {name:14s} {cells}")
    for key, rep in result.get("balance", {}).items():
        cells = "  ".join(f"{p} {rep['mean'][p]:.3f}/{rep['p95'][p]:.3f}" for p in rep["mean"])
        replan = ", ".join(f"{n} {r:.0%}" for n, r in rep["replan_rate"].items())
        lines.append(
            f"balance {key} (busiest/mean, mean/p95 over {rep['samples']} batch-layers): {cells}; re-plan: {replan}"
        )
    return lines


def run_trace(args) -> int:
    from lina.data.routing_trace import load_trace
    from lina.infer.analysis import ESTIMATORS, analyze_trace, write_plots

    names = [n.strip() for n in args.estimators.split(",") if n.strip()]
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown or not names:
        raise ConfigError("--estimators", f"unknown {unknown or names}", f"choose from {', '.join(ESTIMATORS)}")
    if args.batch_tokens < 1:
        raise ConfigError("--batch-tokens", f"is {args.batch_tokens}", "give 1 or more")
    if min(args.devices) < 1:
        raise ConfigError("--devices", f"is {args.devices}", "give device counts >= 1")
    if args.estimator_path_len < 1:
        raise ConfigError("--estimator-path-len", f"is {args.estimator_path_len}", "give a path length >= 1")
    if min(args.path_lens) < 1 or args.balance_path_len < 1:
        raise ConfigError(
            "--path-lens", f"{args.path_lens} / --balance-path-len {args.balance_path_len}", "give path lengths >= 1"
        )
    fix = (
        "pass a routing trace: a .npz written by `lina infer --record-trace FILE.npz`, or a vLLM routing log "
        "(.jsonl) such as ../shared/data/mixtral-8x7b-gsm8k-routing.jsonl"
    )
    if not args.file.is_file():
        raise ConfigError("FILE", f"{args.file} not found", fix)
    if args.file.suffix not in (".npz", ".jsonl"):
        raise ConfigError("FILE", f"{args.file} has suffix {args.file.suffix!r}, neither .npz nor .jsonl", fix)
    start = time.perf_counter()
    try:
        trace = load_trace(args.file)
    except ConfigError:
        raise
    except LinaError as err:  # the file is there but is not a trace
        raise ConfigError("FILE", str(err), fix) from None
    print(
        f"loaded {args.file}: {trace.num_tokens} tokens x {trace.num_layers} layers, {trace.num_experts} "
        f"experts, top-{trace.top_k}",
        flush=True,
    )
    if args.save_trace:
        print(f"wrote {trace.save(args.save_trace)}")
    if args.save_estimator:
        est = fit_estimator(trace, args.estimator, args.estimator_path_len)
        print(
            f"wrote {est.save(args.save_estimator)}: {args.estimator} estimator, path length {est.path_len}, "
            f"{est.num_layers} layers x {est.num_experts} experts (use: lina generate --estimator "
            f"{args.save_estimator})",
            flush=True,
        )
        if args.json is None and args.out is None:
            return 0
    result = analyze_trace(
        trace,
        path_lens=args.path_lens,
        batch_tokens=args.batch_tokens,
        devices=args.devices,
        estimators={n: ESTIMATORS[n] for n in names},
        balance_path_len=args.balance_path_len,
        progress=lambda msg: print(msg, flush=True),
    )
    result["elapsed_s"] = time.perf_counter() - start
    print()
    for line in _summary(result):
        print(line)
    json_path = args.json or (args.out / "analysis.json" if args.out else None)
    if args.out:
        for path in write_plots(result, args.out):
            print(f"wrote {path}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result | {"provenance": provenance()}, indent=1))
        print(f"wrote {json_path}")
    if not args.out:
        print("(pass --out DIR for plots)")
    return 0

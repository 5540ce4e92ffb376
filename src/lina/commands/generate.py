"""``lina generate``: generate text from a trained model on N expert-parallel workers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lina.errors import ConfigError
from lina.infer.policies import all_serving_policies
from lina.obs.provenance import provenance


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a trained model or a Hugging Face MoE checkpoint: batched prefill, then "
        "decode with a KV cache, every MoE layer expert-parallel over the workers",
    )
    p.add_argument("--model", metavar="DIR", help="the --out folder of a `lina train` run (or a `lina export` one)")
    p.add_argument(
        "--hf-model",
        metavar="DIR",
        help="a Hugging Face MoE checkpoint folder (config.json + safetensors) instead; needs pip install 'lina[hf]'",
    )
    p.add_argument(
        "--prompts",
        required=True,
        metavar="FILE.jsonl",
        help='one {"prompt": ..., "id": ..., "max_new_tokens": ...} per line',
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE.jsonl",
        help="one line per request: id, prompt, text, tokens, timings; the summary goes to FILE.summary.json",
    )
    p.add_argument(
        "--workers", type=int, default=2, help="worker processes; each serves every N-th request (default 2)"
    )
    p.add_argument(
        "--placement",
        default="static",
        metavar="|".join(all_serving_policies()),
        help="expert placement policy (default static)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=32, help="per request unless its line says otherwise (default 32)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above: seeded sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--timeout", type=float, default=300.0, help="collective timeout in seconds: a dead worker ends the job"
    )
    p.add_argument(
        "--estimator",
        metavar="FILE.npz",
        help="the popularity estimator lina / lina-window-predict plan with, fitted on a large trace: "
        "`lina infer --record-trace T.npz` on this model, then `lina analyze trace T.npz --save-estimator "
        "FILE.npz --estimator path|decode|logistic` (default: fitted on the prompts' own routing)",
    )
    p.add_argument(
        "--online-decay",
        type=float,
        metavar="D",
        help="0 < D <= 1: the estimator keeps learning while serving, its path table updated after every "
        "step with the routing the gates chose, old counts x D first; the summary reports its top-k hit "
        "rate in the first and second half of the run",
    )
    p.add_argument(
        "--compute",
        default="real",
        help="real, or a device (a100, h100, h200, a .toml): the text comes from the real model, then the "
        "same steps are replayed with the expert FFNs charged that device's time and the timings come from "
        "the replay, in real-cluster units, beside the measured ones",
    )
    p.add_argument("--dilation", type=float, default=1.0, help="time dilation K >= 1 with --compute DEVICE")
    p.add_argument(
        "--emulate",
        default="none",
        metavar="SPEC",
        help="run the workers on the emulated cluster (hosts=H,link=RATE,workers_per_host=W; needs root and "
        "tc; with --dilation K, RATE is the real link and the emulated one runs at RATE / K); none: local "
        "processes (default)",
    )
    p.set_defaults(func=run)


def validate(args: argparse.Namespace):
    """Every check that needs no worker: the model folder, the prompts, the sizes, the estimator
    file, the compute mode and the emulated cluster."""
    from lina.serve.estimators import ESTIMATOR_PLACEMENTS, check_estimator_file
    from lina.serve.requests import read_requests

    if (args.model is None) == (args.hf_model is None):
        raise ConfigError(
            "model",
            "give exactly one of --model and --hf-model",
            "pass --model DIR (a lina train run) or --hf-model DIR",
        )
    if args.placement not in all_serving_policies():
        raise ConfigError(
            "placement", f"unknown placement {args.placement!r}", f"use one of {', '.join(all_serving_policies())}"
        )
    if args.workers < 1:
        raise ConfigError("workers", f"{args.workers}", "use --workers 1 or more")
    if args.max_new_tokens < 1:
        raise ConfigError("max-new-tokens", f"{args.max_new_tokens}", "ask for 1 or more new tokens")
    if args.temperature < 0:
        raise ConfigError("temperature", f"{args.temperature} is negative", "use 0 (greedy) or a positive temperature")
    if args.online_decay is not None and not 0 < args.online_decay <= 1:
        raise ConfigError("online-decay", f"{args.online_decay} is outside (0, 1]", "use e.g. --online-decay 0.9")
    if args.online_decay is not None and args.placement not in ESTIMATOR_PLACEMENTS:
        raise ConfigError(
            "online-decay",
            f"placement {args.placement} uses no estimator",
            f"use --placement {' or '.join(ESTIMATOR_PLACEMENTS)}, or drop --online-decay",
        )
    args.spec = check_compute(args)
    if args.hf_model is not None:
        from lina.hf.lm import checkpoint_model_fields
        from lina.serve.cached_hf import text_codec

        fields = checkpoint_model_fields(args.hf_model)
        experts, context, layers = fields["experts"], fields["max_positions"], fields["n_layers"]
        encode_text = text_codec(args.hf_model)[0]
    else:
        from lina.infer.model_adapter import load_trained_model
        from lina.serve.requests import encode

        model = load_trained_model(args.model)
        if model.cfg.moe_interval != 1:
            raise ConfigError(
                "model", "serving needs every FFN to be an MoE layer (moe_interval 1)", "train with moe_interval = 1"
            )
        experts, context, encode_text = model.cfg.experts, model.cfg.seq_len, encode
        layers = len(model.moe_layers())
    if experts % args.workers and args.placement == "static":
        raise ConfigError(
            "workers",
            f"{experts} experts cannot be spread evenly over {args.workers} workers by static placement",
            "use a worker count that divides the experts, or another --placement",
        )
    if args.estimator is not None:
        check_estimator_file(args.estimator, args.placement, experts, layers, args.online_decay is not None)
    if args.spec is not None and args.spec.world_size != args.workers:
        raise ConfigError(
            "workers",
            f"--workers {args.workers} but the emulated cluster runs {args.spec.world_size} "
            f"({args.spec.hosts} hosts x {args.spec.workers_per_host})",
            f"pass --workers {args.spec.world_size}, or change hosts / workers_per_host in --emulate",
        )
    return read_requests(args.prompts, args.max_new_tokens, context, encode_text)


def check_compute(args: argparse.Namespace):
    """--compute, --dilation and --emulate (ConfigError before anything starts); returns the emulated
    cluster's spec (None: local processes)."""
    from lina.cluster.emulate import parse_emulate
    from lina.devices import check_compute_mode

    check_compute_mode(args.compute, args.dilation)
    return parse_emulate(args.emulate, args.dilation)


def _launch(args: argparse.Namespace, plan: dict, out: Path) -> dict:
    """Run the workers (local processes, or on the emulated cluster) and return rank 0's result."""
    from lina.serve import worker

    if args.spec is None:
        from lina.cluster.launch import launch_local

        return launch_local(worker.run, (plan,), args.workers)[0]
    from lina.cluster.emulate import EmulatedCluster
    from lina.cluster.hostlaunch import run_on_cluster

    work = out.parent / f"{out.stem}.cluster"
    work.mkdir(parents=True, exist_ok=True)
    plan = plan | {"result": str((work / "result.json").resolve()), "world": args.spec.world_size}
    plan_path = work / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=2))
    with EmulatedCluster(args.spec) as cluster:
        run_on_cluster(cluster, "lina.serve.worker", [str(plan_path.resolve())], args.spec.workers_per_host)
    return json.loads((work / "result.json").read_text())


def run(args: argparse.Namespace) -> int:
    requests = validate(args)
    plan = {
        "model": str(Path(args.model).resolve()) if args.model else None,
        "hf_model": str(Path(args.hf_model).resolve()) if args.hf_model else None,
        "prompts": str(Path(args.prompts).resolve()),
        "max_new_tokens": args.max_new_tokens,
        "placement": args.placement,
        "temperature": args.temperature,
        "seed": args.seed,
        "timeout_s": args.timeout,
        "estimator": str(Path(args.estimator).resolve()) if args.estimator else None,
        "online_decay": args.online_decay,
        "compute": args.compute,
        "dilation": args.dilation,
    }
    print(
        f"lina generate: {len(requests)} request(s) on {args.workers} worker(s), placement {args.placement}, "
        f"{'greedy' if args.temperature == 0 else f'sampling at temperature {args.temperature:g}'}",
        flush=True,
    )
    out = Path(args.out)
    result = _launch(args, plan, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for row in result["generations"]:
            fh.write(json.dumps({k: v for k, v in row.items() if k != "index"}) + "\n")
    summary = result["summary"] | {"provenance": provenance()}
    summary_path = out.with_suffix(".summary.json")
    summary_path.write_text(json.dumps(summary, indent=2))
    lat = summary["token_latency_s"]
    ms = lambda v: "-" if v is None else f"{v * 1e3:.1f} ms"  # noqa: E731
    print(
        f"generated {summary['generated_tokens']} tokens for {summary['requests']} request(s) in "
        f"{summary['wall_s']:.1f} s "
        f"({summary['tokens_per_s']:.1f} tokens/s); time to first token p50 {ms(summary['ttft_s_p50'])}; "
        f"per-token latency p50 {ms(lat['p50'])}, p95 {ms(lat['p95'])}, p99 {ms(lat['p99'])}"
    )
    if "timings" in summary:
        m = summary["measured"]
        print(
            f"{summary['timings']} (measured on this machine: per-token p50 {ms(m['token_latency_s']['p50'])}, "
            f"{m['tokens_per_s']:.1f} tokens/s)"
        )
    est = summary.get("estimator")
    if est is not None:
        pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
        print(
            f"estimator top-{est['top_k']} hit rate {pct(est['topk_hit_rate'])} (first half {pct(est['first_half'])}, "
            f"second half {pct(est['second_half'])}); {est['updates']} online update(s)"
        )
    print(f"wrote {out} and {summary_path}")
    return 0

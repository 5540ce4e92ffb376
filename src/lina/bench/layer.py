"""``lina bench layer``: one MoE layer forward+backward at world size 1 against a dense FFN doing
the same active FLOPs (hidden width top_k * d_ff), and the routing overhead (gate + permute +
unpermute) as a share of expert time."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lina.bench.stats import summary
from lina.errors import ConfigError, raise_all
from lina.obs.provenance import provenance
from lina.models.gpt import DenseFFN
from lina.moe.layer import MoELayer
from lina.moe.permute import permute_order


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=4096, help="tokens per call")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="few repeats, small size (for tests)")
    p.add_argument("--json", metavar="FILE", help="write results here")


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def validate(args: argparse.Namespace) -> None:
    """Every problem of the options at once (ConfigError, exit 2), before any work."""
    problems = [ConfigError(f"--{name.replace('_', '-')}", f"{getattr(args, name)} must be >= 1", "give 1 or more")
                for name in ("tokens", "d_model", "d_ff", "experts", "top_k", "repeats") if getattr(args, name) < 1]
    if args.experts >= 1 and args.top_k > args.experts:
        problems.append(ConfigError("--top-k", f"{args.top_k} exceeds --experts {args.experts}",
                                    f"use --top-k <= {args.experts}"))
    raise_all(problems)


def run(args: argparse.Namespace) -> int:
    validate(args)
    if args.quick:
        args.tokens, args.repeats = min(args.tokens, 1024), min(args.repeats, 5)
    torch.manual_seed(0)
    n, d, f, e, k = args.tokens, args.d_model, args.d_ff, args.experts, args.top_k
    moe = MoELayer(d, f, e, top_k=k, dropless=True)
    dense = DenseFFN(d, k * f)
    x = torch.randn(n, d, requires_grad=True)
    routing = moe.router(x.detach())
    order, counts = permute_order(routing.expert_ids, routing.kept, e)
    rows = x.detach()[order // k].clone().requires_grad_()
    counts_list = counts.tolist()

    def moe_step():
        moe.zero_grad(set_to_none=True)
        moe(x).sum().backward()

    def experts_step():
        moe.experts(rows, counts_list).sum().backward()

    def dense_step():
        dense(x).sum().backward()

    results = {"moe": [], "experts": [], "dense": []}
    for _ in range(args.repeats):  # interleaved
        results["moe"] += _time(moe_step, 1)
        results["experts"] += _time(experts_step, 1)
        results["dense"] += _time(dense_step, 1)
    stats = {name: summary(v) for name, v in results.items()}
    overhead = (stats["moe"]["median"] - stats["experts"]["median"]) / stats["experts"]["median"]
    out = {
        "shape": {"tokens": n, "d_model": d, "d_ff": f, "experts": e, "top_k": k, "threads": torch.get_num_threads()},
        "median_ms": {name: s["median"] * 1e3 for name, s in stats.items()},
        "min_ms": {name: s["min"] * 1e3 for name, s in stats.items()},
        "max_ms": {name: s["max"] * 1e3 for name, s in stats.items()},
        "routing_overhead_share_of_expert_time": overhead,
        "moe_vs_dense_same_active_flops": stats["moe"]["median"] / stats["dense"]["median"],
        "target_overhead_max": 0.25,
        "provenance": provenance(),
    }
    print(f"MoE layer fwd+bwd, {n} tokens, d_model {d}, d_ff {f}, {e} experts, top-{k}, {out['shape']['threads']} threads ({args.repeats} interleaved repeats, median [min-max] ms)")
    for name in ("moe", "experts", "dense"):
        s = stats[name]
        print(f"  {name:8s} {s['median'] * 1e3:8.2f}  [{s['min'] * 1e3:.2f}-{s['max'] * 1e3:.2f}]")
    print(f"  routing overhead (gate + permute + unpermute) = {overhead * 100:.1f}% of expert time (target <= 25%)")
    print(f"  MoE / dense FFN of the same active FLOPs = {out['moe_vs_dense_same_active_flops']:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0

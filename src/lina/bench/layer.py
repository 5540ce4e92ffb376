"""``lina bench layer``: one MoE layer forward+backward at world size 1 against a dense FFN doing
the same active FLOPs (hidden width top_k * d_ff), and the routing overhead (gate + permute +
unpermute) as a share of expert time. With ``--expert swiglu`` the experts (and the dense FFN) are
SwiGLU, and the experts are timed both per expert (one matmul per expert and weight) and grouped
(one ``grouped_mm`` per weight over all experts) where the device supports it."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lina.bench.stats import summary
from lina.errors import ConfigError, raise_all
from lina.models.gpt import DenseFFN
from lina.moe.experts import grouped_mm_supported
from lina.moe.layer import MoELayer
from lina.moe.permute import permute_order
from lina.moe.shared import SharedExperts
from lina.moe.spec import ExpertSpec, MoESpec, SharedExpertSpec
from lina.obs.provenance import provenance


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=4096, help="tokens per call")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument(
        "--expert", choices=("gelu", "swiglu"), default="gelu", help="expert FFN; swiglu also times grouped_mm"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="few repeats, small size (for tests)")
    p.add_argument("--json", metavar="FILE", help="write results here")


def _time(fn, repeats: int, sync=lambda: None) -> list[float]:
    fn()  # warm-up
    sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def validate(args: argparse.Namespace) -> None:
    """Every problem of the options at once (ConfigError, exit 2), before any work."""
    problems = [
        ConfigError(f"--{name.replace('_', '-')}", f"{getattr(args, name)} must be >= 1", "give 1 or more")
        for name in ("tokens", "d_model", "d_ff", "experts", "top_k", "repeats")
        if getattr(args, name) < 1
    ]
    if args.experts >= 1 and args.top_k > args.experts:
        problems.append(
            ConfigError("--top-k", f"{args.top_k} exceeds --experts {args.experts}", f"use --top-k <= {args.experts}")
        )
    raise_all(problems)


def run(args: argparse.Namespace) -> int:
    validate(args)
    if args.quick:
        args.tokens, args.repeats = min(args.tokens, 1024), min(args.repeats, 5)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{args.device} but no CUDA device is visible", "use --device cpu")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    n, d, f, e, k = args.tokens, args.d_model, args.d_ff, args.experts, args.top_k
    swiglu = args.expert == "swiglu"
    spec = MoESpec(expert=ExpertSpec("swiglu")) if swiglu else MoESpec()
    moe = MoELayer(d, f, e, top_k=k, dropless=True, spec=spec).to(device, dtype)
    dense = (SharedExperts(d, SharedExpertSpec(d_ff=k * f)) if swiglu else DenseFFN(d, k * f)).to(device, dtype)
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    routing = moe.router(x.detach())
    order, counts = permute_order(routing.expert_ids, routing.kept, e)
    rows = x.detach()[order // k].clone().requires_grad_()
    counts_list = counts.tolist()
    grouped = swiglu and grouped_mm_supported(device, dtype)

    def set_grouped(on: bool) -> None:
        if swiglu:
            moe.experts.spec = ExpertSpec("swiglu", grouped_mm=on)

    def moe_step(on: bool = False):
        set_grouped(on)
        moe.zero_grad(set_to_none=True)
        moe(x).sum().backward()

    def experts_step(on: bool = False):
        set_grouped(on)
        moe.experts(rows, counts_list).sum().backward()

    def dense_step():
        dense(x).sum().backward()

    steps = {"moe": moe_step, "experts": experts_step, "dense": dense_step}
    if grouped:
        steps["moe_grouped"] = lambda: moe_step(True)
        steps["experts_grouped"] = lambda: experts_step(True)
    results = {name: [] for name in steps}
    for _ in range(args.repeats):  # interleaved
        for name, fn in steps.items():
            results[name] += _time(fn, 1, sync)
    set_grouped(False)
    stats = {name: summary(v) for name, v in results.items()}
    overhead = (stats["moe"]["median"] - stats["experts"]["median"]) / stats["experts"]["median"]
    out = {
        "shape": {
            "tokens": n,
            "d_model": d,
            "d_ff": f,
            "experts": e,
            "top_k": k,
            "threads": torch.get_num_threads(),
            "expert": args.expert,
            "device": str(device),
            "dtype": args.dtype,
        },
        "median_ms": {name: s["median"] * 1e3 for name, s in stats.items()},
        "min_ms": {name: s["min"] * 1e3 for name, s in stats.items()},
        "max_ms": {name: s["max"] * 1e3 for name, s in stats.items()},
        "routing_overhead_share_of_expert_time": overhead,
        "moe_vs_dense_same_active_flops": stats["moe"]["median"] / stats["dense"]["median"],
        "target_overhead_max": 0.25,
        "provenance": provenance(),
        "grouped_mm": grouped,
    }
    if grouped:
        grouped_experts = stats["experts_grouped"]["median"]
        out["routing_overhead_share_grouped"] = (stats["moe_grouped"]["median"] - grouped_experts) / grouped_experts
        out["experts_per_expert_over_grouped"] = stats["experts"]["median"] / stats["experts_grouped"]["median"]
    where = f"{device}, {args.dtype}" + (f", {out['shape']['threads']} threads" if device.type == "cpu" else "")
    print(
        f"MoE layer fwd+bwd, {n} tokens, d_model {d}, d_ff {f}, {e} {args.expert} experts, top-{k}, {where} "
        f"({args.repeats} interleaved repeats, median [min-max] ms)"
    )
    for name in steps:
        s = stats[name]
        print(f"  {name:16s} {s['median'] * 1e3:8.2f}  [{s['min'] * 1e3:.2f}-{s['max'] * 1e3:.2f}]")
    print(f"  routing overhead (gate + permute + unpermute) = {overhead * 100:.1f}% of expert time (target <= 25%)")
    if grouped:
        print(
            f"  grouped experts: per-expert / grouped = {out['experts_per_expert_over_grouped']:.2f}x; "
            f"routing overhead with grouped experts = {out['routing_overhead_share_grouped'] * 100:.1f}%"
        )
    elif swiglu:
        print(f"  grouped_mm does not run on {device} with {args.dtype}: experts computed per expert only")
    print(f"  MoE / dense FFN of the same active FLOPs = {out['moe_vs_dense_same_active_flops']:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0

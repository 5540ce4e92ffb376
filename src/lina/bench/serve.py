"""``lina bench serve``: prefill and decode latency of ``static``, ``eplb``, ``lina`` and ``oracle``
placement, interleaved step by step in one run, on requests replayed from routing traces:

- ``own``: routing of the project's own MoE GPT on held-out text (8 experts, top-2; trained for
  the full run, random weights under ``--quick``);
- ``mixtral``: the real Mixtral-8x7B trace in ../shared/data (8 experts, top-2);
- ``fine``: a fine-grained shape, 64 experts top-8 (a synthetic trace with Zipf popularity and
  path affinity; no real trace of that shape is at hand).

Per placement: prefill batch latency and decode per-token latency p50/p95/p99 (each step's
slowest rank), tokens/s, and which source lina's plans came from; per trace: the estimator's
top-k hit rate on prefill and decode tokens. Compute is real or a device's time
(``--compute a100 --dilation K``); the links are the emulated cluster's (``--emulate``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from lina.bench.stats import percentile
from lina.data.routing_trace import RoutingTrace, load_trace, synthetic_trace
from lina.errors import ConfigError
from lina.extras import pyplot
from lina.infer.policies import all_serving_policies
from lina.obs.provenance import provenance
from lina.placement.estimators import PathEstimator
from lina.placement.estimators.decode import DecodeAwareEstimator, previous_rows
from lina.placement.metrics import token_topk_hits, token_topk_recall

POLICIES = tuple(all_serving_policies())  # the per-batch policies, then lina-window and lina-window-predict
SHAPES = ("own", "mixtral", "fine")
MIXTRAL_FILE = Path("shared") / "data" / "mixtral-8x7b-gsm8k-routing.jsonl"


def default_mixtral_trace() -> Path:
    """The Mixtral trace in the nearest ``shared/data`` folder above the package (a checkout's
    sibling), or where it would be beside this checkout."""
    here = Path(__file__).resolve()
    for folder in here.parents:
        if (folder / MIXTRAL_FILE).is_file():
            return folder / MIXTRAL_FILE
    return here.parents[3].parent / MIXTRAL_FILE


DEFAULT_MIXTRAL = default_mixtral_trace()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes, few rounds, local processes (for tests)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the shapes a stopped run of the same settings finished (their result.json beside --json) and "
        "serve only the rest",
    )
    p.add_argument("--json", metavar="FILE", default="runs/bench-serve/bench-serve.json")
    p.add_argument("--shapes", default=",".join(SHAPES), help="which of own, mixtral, fine to serve")
    p.add_argument("--mixtral-trace", metavar="FILE", default=str(DEFAULT_MIXTRAL))
    p.add_argument(
        "--emulate",
        default="hosts=4,link=100mbit,workers_per_host=1",
        help="the emulated cluster (hosts=H,link=RATE,workers_per_host=W; with --dilation K, RATE is the real "
        "link and the emulated one runs at RATE / K), or none: local processes on loopback",
    )
    p.add_argument("--workers", type=int, default=4, help="workers with --emulate none")
    p.add_argument("--compute", default="real", help="real, or a device (a100, h100, h200, a .toml): device time")
    p.add_argument("--dilation", type=float, default=1.0, help="time dilation K with --compute DEVICE")
    p.add_argument("--requests-per-rank", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers", type=int, default=16, help="at most this many MoE layers of each trace")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--path-len", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)


def own_trace(out: Path, quick: bool, reuse: bool = False) -> RoutingTrace:
    """The project's own MoE GPT's routing on held-out text: trained as ``lina bench infer``
    trains it, or with random weights under ``--quick`` (no training run)."""
    if not quick:
        from lina.bench.infer import train_model_trace

        return train_model_trace(out, quick=False, reuse=reuse)
    from lina.config import ModelConfig
    from lina.data.corpus import load_corpus, sample_batch
    from lina.infer.model_adapter import record_routing
    from lina.models.gpt import MoEGPT

    torch.manual_seed(0)
    model = MoEGPT(ModelConfig(d_model=64, n_layers=4, n_heads=2, d_ff=128, seq_len=64, experts=8, top_k=2))
    corpus = load_corpus("", 0.3)
    batches = [sample_batch(corpus.val, 8, 64, 1234, i, 0)[0] for i in range(2)]
    return record_routing(model, batches, "lina MoE GPT (random weights) on held-out Python source")


def fine_trace(quick: bool) -> RoutingTrace:
    """64 experts, top-8: Zipf popularity per layer, a token's top-1 follows its previous one
    with probability 0.5."""
    return synthetic_trace(
        2048 if quick else 16384, 4 if quick else 16, 64, top_k=8, affinity=0.5, skew=1.0, tokens_per_seq=128
    )


def topk_accuracy(est: PathEstimator, held: RoutingTrace, positions: slice | None = None) -> dict[str, float]:
    """Over (token, layer >= 1): ``hit``, the share whose estimated top-k experts are the real
    ones (the paper's accuracy), and ``recall``, the share of real experts among the estimated
    top-k. ``positions`` keeps only tokens at those positions of their sequence (decode tokens)."""
    ex = held.expert_tensor()
    keep = torch.ones(ex.shape[0], dtype=torch.bool)
    if positions is not None:
        idx = torch.from_numpy(held.token_idx.astype(np.int64))
        keep = (idx >= (positions.start or 0)) & (idx < (positions.stop or 1 << 30))
    ex = ex[keep]
    if ex.shape[0] == 0:
        return {"hit": float("nan"), "recall": float("nan")}
    preds = [(est.predict(j, ex[:, max(0, j - est.path_len) : j, 0]), ex[:, j]) for j in range(1, held.num_layers)]
    return {
        "hit": float(torch.cat([token_topk_hits(p, r) for p, r in preds]).float().mean()),
        "recall": float(torch.cat([token_topk_recall(p, r) for p, r in preds]).mean()),
    }


def decode_aware_accuracy(aware: DecodeAwareEstimator, held: RoutingTrace, first: int) -> dict[str, float]:
    """``hit`` and ``recall`` as :func:`topk_accuracy`, of the decode-aware estimator on tokens at
    position ``first`` or later (each has a previous token)."""
    ex = held.expert_tensor()
    prev = torch.from_numpy(previous_rows(held))
    idx = torch.from_numpy(held.token_idx.astype(np.int64))
    keep = (idx >= first) & (prev >= 0)
    cur, before = ex[keep], ex[prev[keep]]
    if cur.shape[0] == 0:
        return {"hit": float("nan"), "recall": float("nan")}
    preds = [(aware.predict(j, cur[:, :j, 0], before[:, j, 0]), cur[:, j]) for j in range(1, held.num_layers)]
    return {
        "hit": float(torch.cat([token_topk_hits(p, r) for p, r in preds]).float().mean()),
        "recall": float(torch.cat([token_topk_recall(p, r) for p, r in preds]).mean()),
    }


def _pct(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values_s]
    return {"p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "p99_ms": percentile(ms, 99)}


def summarize(result: dict, world: int, args) -> dict:
    """Latency percentiles and tokens/s per policy and phase, in real-cluster units: each measured
    step time divided by the dilation (1 with real compute)."""
    out = {}
    prefill_tokens = world * args.requests_per_rank * args.prompt_len
    decode_tokens = world * args.requests_per_rank
    k = args.dilation
    for name in POLICIES:
        pre = [v / k for v in result[name]["prefill_s"]]
        dec = [v / k for v in result[name]["decode_s"]]
        out[name] = {
            "prefill": _pct(pre) | {"tokens_per_s": prefill_tokens * len(pre) / sum(pre)},
            "decode": _pct(dec) | {"tokens_per_s": decode_tokens * len(dec) / sum(dec)},
            "sources": result["sources"][name],
        }
        if name in result.get("arms", {}):  # lina-auto: which arm served each class of batch
            out[name]["arms"] = result["arms"][name]
    return out


def resumable(folder: Path, plan: dict) -> bool:
    """Whether ``folder`` holds a finished run (``result.json``) of exactly ``plan``."""
    try:
        previous = json.loads((folder / "plan.json").read_text())
    except (OSError, ValueError):
        return False
    return previous == plan and (folder / "result.json").is_file()


def serve_shape(args, name: str, trace: RoutingTrace, out: Path, spec) -> dict:
    by = "seq" if len(np.unique(trace.seq_id)) >= 4 else "position"
    fit, held = trace.split(0.7, by=by)
    if by == "position":
        held = trace  # too few sequences to hold one out: serve them all (the estimator saw 70% of them)
    est = PathEstimator(path_len=min(args.path_len, trace.num_layers - 1)).fit(fit)
    decode_from = slice(args.prompt_len, None)
    accuracy = {"prefill": topk_accuracy(est, held), "decode": topk_accuracy(est, held, decode_from)}
    aware = DecodeAwareEstimator(est).fit(fit)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    layers = min(args.layers, trace.num_layers)
    world = spec.world_size if spec is not None else args.workers
    plan = {
        "trace": str(held.save(folder / "held-out.npz")),
        "estimator": str(est.save(folder / "estimator.npz")),
        "decode_estimator": str(aware.save(folder / "estimator-decode.npz")),
        "layers": layers,
        "d_model": args.d_model,
        "d_ff": args.d_ff,
        "requests_per_rank": args.requests_per_rank,
        "prompt_len": args.prompt_len,
        "decode_steps": args.decode_steps,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "policies": list(POLICIES),
        "compute": args.compute,
        "dilation": args.dilation,
        "seed": args.seed,
        "result": str(folder / "result.json"),
        "world": world,
    }
    plan_path = folder / "plan.json"
    finished = resumable(folder, plan) if args.resume else False
    plan_path.write_text(json.dumps(plan, indent=2))
    print(
        f"\n{name}: {trace.num_experts} experts, top-{trace.top_k}, {layers} layers; {world} workers x "
        f"{args.requests_per_rank} requests of {args.prompt_len} prompt + {args.decode_steps} decode tokens",
        flush=True,
    )
    if finished:
        print(f"  reusing {folder / 'result.json'}: a finished run of this same plan (--resume)", flush=True)
    elif spec is None:
        from lina.bench import serve_worker
        from lina.cluster.launch import launch_local

        launch_local(serve_worker.run, (plan,), world)
    else:
        from lina.cluster.emulate import EmulatedCluster
        from lina.cluster.hostlaunch import run_on_cluster

        with EmulatedCluster(spec) as cluster:
            run_on_cluster(cluster, "lina.bench.serve_worker", [str(plan_path)], spec.workers_per_host, timeout_s=3000)
    result = json.loads((folder / "result.json").read_text())
    return {
        "shape": name,
        "source": trace.source,
        "experts": trace.num_experts,
        "top_k": trace.top_k,
        "layers": layers,
        "policies": summarize(result, world, args),
        "estimator_topk_accuracy": {
            "path": accuracy,
            "path_len": est.path_len,
            "decode_aware": {"decode": decode_aware_accuracy(aware, held, args.prompt_len)},
            "decode_aware_alpha": aware.alpha.tolist(),
        },
    }


def regime(args, spec) -> dict:
    from lina.cluster.emulate import format_rate

    return {
        "link": format_rate(int(spec.link_bps * args.dilation)) if spec is not None else "loopback (no emulation)",
        "emulated_link": spec.link if spec is not None else None,
        "hosts": spec.hosts if spec is not None else 1,
        "compute": args.compute,
        "dilation": args.dilation,
        "d_model": args.d_model,
        "d_ff": args.d_ff,
        "modelled": "MoE layers only (attention not modelled); routing from the traces",
    }


def _acc(a: dict[str, float]) -> str:
    return f"{a['hit'] * 100:.1f}% ({a['recall'] * 100:.1f}%)"


def print_report(entries: list[dict], reg: dict) -> None:
    print(
        f"\nregime: link {reg['link']}, compute {reg['compute']} x dilation {reg['dilation']:g}, "
        f"{reg['hosts']} host(s), d_model {reg['d_model']}, d_ff {reg['d_ff']}; {reg['modelled']}"
        + (
            f"; latencies in real-cluster ms: measured / {reg['dilation']:g}"
            if reg["compute"] != "real" and reg["dilation"] != 1
            else ""
        )
    )
    for r in entries:
        acc = r["estimator_topk_accuracy"]
        print(
            f"\n{r['shape']} ({r['experts']} experts, top-{r['top_k']}, {r['layers']} layers): estimator top-{r['top_k']} "
            f"hit rate (recall), path l={acc['path_len']}: prefill {_acc(acc['path']['prefill'])}, decode "
            f"{_acc(acc['path']['decode'])}"
            + "".join(
                f"; {src}: decode {_acc(v['decode'])}"
                for src, v in acc.items()
                if src not in ("path", "path_len", "decode_aware_alpha")
            )
            + " (paper 54-60% hit rate at l=3)"
        )
        print(f"  {'policy':19s} {'phase':8s} {'p50 ms':>9s} {'p95 ms':>9s} {'p99 ms':>9s} {'tokens/s':>10s}")
        for name, s in r["policies"].items():
            for phase in ("prefill", "decode"):
                x = s[phase]
                print(
                    f"  {name:19s} {phase:8s} {x['p50_ms']:9.1f} {x['p95_ms']:9.1f} {x['p99_ms']:9.1f} {x['tokens_per_s']:10.1f}"
                )
        print(f"  lina's plan sources per layer: {r['policies']['lina']['sources']}")
        if "lina-window-predict" in r["policies"]:
            print(f"  lina-window-predict's window plans per layer: {r['policies']['lina-window-predict']['sources']}")
        if "lina-auto" in r["policies"]:
            _print_auto(r["policies"])


def _print_auto(policies: dict) -> None:
    """lina-auto's p95 against the better of static and eplb per phase, and its arms' use."""
    auto = policies["lina-auto"]
    for phase in ("prefill", "decode"):
        best = min(policies[b][phase]["p95_ms"] for b in ("static", "eplb") if b in policies)
        print(
            f"  lina-auto {phase} p95: {best / auto[phase]['p95_ms']:.2f}x the better of static and eplb (target >= 1)"
        )
    for klass, arms in auto.get("arms", {}).items():
        used = ", ".join(
            f"{arm} {a['batches']}" + ("" if a["mean_ms"] is None else f" ({a['mean_ms']:.1f} ms measured)")
            for arm, a in arms.items()
        )
        print(f"  lina-auto on batches of {klass}: {used}")


def plot(entries: list[dict], path: Path) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(entries), figsize=(5 * len(entries), 3.6), squeeze=False)
    for ax, r in zip(axes[0], entries):
        x = np.arange(len(POLICIES))
        for i, phase in enumerate(("prefill", "decode")):
            ax.bar(x + 0.4 * i, [r["policies"][p][phase]["p95_ms"] for p in POLICIES], 0.4, label=f"{phase} p95")
        ax.set_xticks(x + 0.2, POLICIES, rotation=30, fontsize=7)
        ax.set_ylabel("ms (prefill: per batch; decode: per token)")
        ax.set_title(f"{r['shape']}: {r['experts']} experts, top-{r['top_k']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check(args) -> object:
    """Every setting checked before any worker starts; returns the emulated cluster spec (None: local)."""
    from lina.cluster.emulate import parse_emulate
    from lina.devices import check_compute_mode

    check_compute_mode(args.compute, args.dilation)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        raise ConfigError("shapes", f"unknown shape(s) {', '.join(unknown)}", f"use some of {', '.join(SHAPES)}")
    for field in ("requests_per_rank", "prompt_len", "decode_steps", "rounds", "layers", "workers"):
        if getattr(args, field) < 1:
            raise ConfigError(field.replace("_", "-"), f"{getattr(args, field)}", "give 1 or more")
    if args.warmup < 0:
        raise ConfigError("warmup", f"{args.warmup}", "give 0 or more warm-up rounds")
    return parse_emulate(args.emulate, args.dilation)


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.requests_per_rank, args.prompt_len, args.decode_steps = 2, 8, 6
        args.rounds, args.warmup, args.layers, args.d_model, args.d_ff = 2, 1, 4, 64, 128
    spec = check(args)
    json_path = Path(args.json)
    out = json_path.parent
    out.mkdir(parents=True, exist_ok=True)
    traces: dict[str, RoutingTrace] = {}
    for shape in args.shapes.split(","):
        if shape == "own":
            traces["own"] = own_trace(out, args.quick, reuse=args.resume)
        elif shape == "mixtral":
            if Path(args.mixtral_trace).exists():
                traces["mixtral"] = load_trace(args.mixtral_trace)
            else:
                print(f"note: {args.mixtral_trace} not found; no Mixtral shape (pass --mixtral-trace)")
        else:
            traces["fine"] = fine_trace(args.quick)
    reg = regime(args, spec)
    entries = [serve_shape(args, name, trace, out, spec) for name, trace in traces.items()]
    json_path.write_text(json.dumps({"regime": reg, "runs": entries, "provenance": provenance()}, indent=2))
    plot(entries, json_path.with_suffix(".png"))
    print_report(entries, reg)
    print(f"\nwrote {json_path}, {json_path.with_suffix('.png')}")
    return 0

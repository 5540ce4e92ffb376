"""``lina bench infer``: batch latency of ``static``, ``eplb``, ``lina`` and ``oracle`` placement,
interleaved in one run, on the emulated cluster (4 hosts x 2 workers, one expert per worker), on
(a) routing recorded from the project's own trained model on held-out text and (b) the real
Mixtral-8x7B trace in ../shared/data. Real activations of the configured size flow through real
all-to-alls and expert FFNs; only the gate decisions come from the trace.

``--compute DEVICE --dilation K``: the expert FFNs take that device's time x K instead of being
computed (:mod:`lina.devicetime`), the links run at ``--link`` / K, and every latency is reported
in real-cluster units (measured wall time / K) beside the regime; placement and scheduling are
the same code, computed for real."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from lina.bench.infer_cluster import add_cluster_argument, cluster_lines, cluster_regime, resolve_cluster
from lina.bench.plan import InferBenchPlan
from lina.bench.stats import percentile
from lina.cluster.emulate import EmulatedCluster, EmulateSpec, format_rate, parse_rate
from lina.cluster.hostlaunch import run_on_cluster
from lina.cluster.spec import describe
from lina.data.routing_trace import RoutingTrace, load_trace
from lina.errors import ConfigError, LinaError
from lina.extras import pyplot
from lina.infer.policies import SERVING_POLICIES
from lina.obs.provenance import provenance
from lina.placement.estimators import PathEstimator
from lina.placement.metrics import token_topk_hits

POLICIES = tuple(SERVING_POLICIES)  # every registered serving policy, interleaved in this order
PAPER = {"p95_speedup_avg": 1.63, "estimator_accuracy_l3": (0.54, 0.60), "phase_cost_ms": 6.2, "phase2_noop_ms": 1.45}
DEFAULT_MIXTRAL = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "mixtral-8x7b-gsm8k-routing.jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small model, few batches, 8 layers (for tests)")
    p.add_argument("--json", metavar="FILE", default="runs/bench-infer/bench-infer.json")
    p.add_argument(
        "--trace",
        "--routing-trace",
        dest="trace",
        metavar="FILE",
        help="serve only this trace (.npz or Mixtral .jsonl); --routing-trace is the same option",
    )
    p.add_argument(
        "--compute",
        default=None,
        help="real (the expert FFNs compute on this CPU) or a device (a100, h100, h200, a .toml): each expert FFN "
        "takes that device's time x --dilation instead; --link is then the real cluster's (default real; with "
        "--cluster: its device)",
    )
    p.add_argument(
        "--dilation",
        type=float,
        default=None,
        help="time dilation K with --compute DEVICE: device times x K, emulated link = --link / K; latencies "
        "are reported / K (default 1; with --cluster: the smallest that tc shapes and the start-up check passes)",
    )
    add_cluster_argument(p)
    p.add_argument(
        "--skip-dilation-check",
        action="store_true",
        help="with --compute DEVICE: do not measure, before each trace, whether this machine's CPU keeps up with "
        "the emulated links at --dilation (an all-to-all alone at K and 2K, a few seconds)",
    )
    p.add_argument(
        "--mixtral-trace", metavar="FILE", default=str(DEFAULT_MIXTRAL), help="the real Mixtral routing trace"
    )
    p.add_argument(
        "--model", metavar="DIR", help="a `lina train --out` folder to record trace (a) from (default: train one now)"
    )
    p.add_argument("--link", default=None, help="each host's link rate (default 100mbit)")
    p.add_argument("--hosts", type=int, default=None, help="emulated hosts (default 4)")
    p.add_argument("--workers-per-host", type=int, default=None, help="workers per host (default 2)")
    p.add_argument("--tokens-per-rank", type=int, default=128)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--layers", type=int, default=32, help="at most this many MoE layers of the trace")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--path-len", type=int, default=3)
    p.add_argument("--eplb-replan-every", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)


def train_model_trace(out: Path, quick: bool, reuse: bool = False) -> RoutingTrace:
    """Train a small 8-expert MoE GPT with ``lina train``'s code and record its routing on held-out text.
    ``reuse``: a model already trained into ``out/model`` (its summary written) is loaded, not retrained."""
    from lina.cluster.launch import launch_local
    from lina.config import ModelConfig, OutputConfig, TrainConfig
    from lina.data.corpus import load_corpus, sample_batch
    from lina.infer.model_adapter import load_trained_model, record_routing
    from lina.train import worker

    run_dir = out / "model"
    cfg = TrainConfig(
        model=ModelConfig(d_model=128, n_layers=8, n_heads=4, d_ff=256, seq_len=128, experts=8, top_k=2),
        workers=2,
        steps=20 if quick else 150,
        batch_size=8,
        eval_every=1000,
        output=OutputConfig(out=str(run_dir), checkpoint_every=1000, log_every=25),
        corpus_max_mb=1.0,
    )
    cfg.validate()
    if reuse and (run_dir / "summary.json").is_file():
        print(f"reusing the routing model trained into {run_dir}", flush=True)
    else:
        print(f"training the routing model ({cfg.steps} steps, 8 experts, 8 layers) into {run_dir}", flush=True)
        launch_local(worker.run, (cfg.to_dict(),), cfg.workers)
    model = load_trained_model(run_dir)
    corpus = load_corpus("", 1.0)
    batches = [sample_batch(corpus.val, 8, cfg.model.seq_len, 1234, i, 0)[0] for i in range(2 if quick else 6)]
    return record_routing(model, batches, f"lina MoE GPT ({cfg.steps} steps) on held-out Python source")


def estimator_accuracy(est: PathEstimator, held: RoutingTrace) -> float:
    """Share of (token, layer >= 1) whose estimated top-k experts equal the real ones."""
    ex = held.expert_tensor()
    hits = [
        token_topk_hits(est.predict(layer, ex[:, max(0, layer - est.path_len) : layer, 0]), ex[:, layer])
        for layer in range(1, held.num_layers)
    ]
    return float(torch.cat(hits).float().mean())


def trace_skew(trace: RoutingTrace, layers: int) -> float:
    """Median over layers of the most over the least chosen expert's token-slots."""
    counts = trace.slot_counts()[:layers].double()
    return float((counts.max(1).values / counts.min(1).values.clamp_min(1)).median())


def _latency_stats(result: dict, policies: list[str], dilation: float = 1.0) -> dict:
    """Per policy: batch latency percentiles and per-layer all-to-all time, in ms of the real
    cluster (measured wall time / ``dilation``), and the busiest device's rows over the mean."""
    out = {}
    ms = 1e3 / dilation
    for name in policies:
        lat = [b["latency_s"] * ms for b in result[name]["batches"]]
        layer = [x * ms for b in result[name]["batches"] for x in b["layer_a2a_s"]]
        out[name] = {
            "p50_ms": percentile(lat, 50),
            "p95_ms": percentile(lat, 95),
            "p99_ms": percentile(lat, 99),
            "min_ms": min(lat),
            "max_ms": max(lat),
            "layer_a2a_p95_ms": percentile(layer, 95),
            "layer_a2a_p50_ms": percentile(layer, 50),
            "batches": len(lat),
        }
        rows = result[name]["device_rows_by_rank"]  # [rank][batch][layer]
        per = np.array(rows, dtype=float)  # ranks x batches x layers
        out[name]["busiest_over_mean"] = float(np.median(per.max(0) / np.maximum(per.mean(0), 1e-9)))
    return out


def serve_trace(args, name: str, trace: RoutingTrace, out: Path) -> dict:
    world = args.hosts * args.workers_per_host
    if trace.num_experts % world:
        raise LinaError(
            f"trace {name} has {trace.num_experts} experts, which do not split evenly over the cluster's {world} workers. "
            "Fix: --hosts/--workers-per-host giving a divisor of the expert count"
        )
    by = "seq" if len(np.unique(trace.seq_id)) >= 4 else "position"
    fit, held = trace.split(0.7, by=by)
    est = PathEstimator(path_len=args.path_len).fit(fit)
    accuracy = estimator_accuracy(est, held)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    held_path, est_path = held.save(folder / "held-out.npz"), est.save(folder / "estimator.npz")
    layers = min(args.layers, trace.num_layers)
    plan = InferBenchPlan(
        trace=str(held_path),
        estimator=str(est_path),
        layers=layers,
        d_model=args.d_model,
        d_ff=args.d_ff,
        tokens_per_rank=args.tokens_per_rank,
        batches=args.batches,
        warmup=args.warmup,
        policies=tuple(POLICIES),
        eplb_replan_every=args.eplb_replan_every,
        seed=args.seed,
        result=str(folder / "result.json"),
        world=world,
        compute=args.compute,
        dilation=float(args.dilation),
    )
    plan.save(folder / "plan.json")
    link_bps = parse_rate(args.link)
    check = getattr(args, "dilation_check", None)
    spec = _emulate_spec(args)
    print(
        f"\n{name}: {trace.num_tokens} tokens ({held.num_tokens} held out, split by {by}), {layers} layers, {trace.num_experts} experts, "
        f"top-{trace.top_k}; estimator l={args.path_len} top-{trace.top_k} accuracy {accuracy * 100:.1f}% on held-out; "
        f"serving on {describe(spec, args.dilation)}, compute {_compute_text(args)}",
        flush=True,
    )
    with EmulatedCluster(spec) as cluster:
        run_on_cluster(
            cluster, "lina.bench.infer_worker", [str(folder / "plan.json")], spec.workers_per_host, timeout_s=3000
        )
    result = json.loads((folder / "result.json").read_text())
    stats = _latency_stats(result, list(POLICIES), args.dilation)
    lina_stats = result["lina_policy_stats"] or {"checked": 0, "replans": 0}
    lina_batches = result["lina"]["batches"]
    phase1 = [b["phase1_s"] * 1e3 / max(1, len(b["layer_a2a_s"]) - 1) for b in lina_batches]
    phase2 = [x * 1e3 for b in lina_batches for x in b["phase2_s"]]
    st, ora, li = stats["static"]["p95_ms"], stats["oracle"]["p95_ms"], stats["lina"]["p95_ms"]
    return {
        "trace": name,
        "source": trace.source,
        "policies": stats,
        "p95_speedup_vs_static": {p: st / s["p95_ms"] for p, s in stats.items()},
        "p50_speedup_vs_static": {p: stats["static"]["p50_ms"] / s["p50_ms"] for p, s in stats.items()},
        "oracle_gain_captured_p95": (st - li) / (st - ora) if st > ora else None,
        "estimator": {
            "top2_accuracy": accuracy,
            "path_len": args.path_len,
            "replan_rate": lina_stats["replans"] / max(1, lina_stats["checked"]),
            "split": by,
        },
        "scheduling_cost_ms": {
            "phase1_per_layer_median": float(np.median(phase1)) if phase1 else None,
            "phase2_per_layer_median": float(np.median(phase2)) if phase2 else None,
        },
        "device_time": result.get("device_time"),
        "regime": {
            "link": format_rate(link_bps),
            "emulated_link": spec.link,
            "compute": args.compute,
            "dilation": args.dilation,
            "link_efficiency": None if check is None else check.link_efficiency,
            "cluster": cluster_regime(getattr(args, "fitted_cluster", None), args.dilation),
            "workers": f"{spec.hosts} hosts x {spec.workers_per_host}",
            "experts_per_worker": trace.num_experts // world,
            "units": "real cluster (measured wall time / dilation)",
            "skew": trace_skew(held, layers),
            "busiest_over_mean_static": stats["static"]["busiest_over_mean"],
            "batch_tokens": args.tokens_per_rank * spec.world_size,
            "layers": layers,
            "d_model": args.d_model,
        },
    }


def print_report(entries: list[dict]) -> None:
    for r in entries:
        reg = r["regime"]
        regime = (
            "real compute" if reg.get("compute", "real") == "real" else f"{reg['compute']} time x {reg['dilation']:g}"
        )
        if reg.get("dilation", 1.0) != 1.0:
            regime += (
                f" (emulated link {reg['emulated_link']}; latencies in real-cluster ms: measured / {reg['dilation']:g})"
            )
        if reg.get("link_efficiency") is not None:
            regime += f", link efficiency {reg['link_efficiency']:.0%}"
        print(
            f"\n{r['trace']} | link {reg['link']}, {regime}, skew (max/min expert, median layer) {reg['skew']:.2f}, busiest device / mean under static "
            f"{reg['busiest_over_mean_static']:.2f}, {reg['batch_tokens']} tokens per batch, {reg['layers']} layers"
        )
        for line in cluster_lines(reg.get("cluster")):
            print(f"  {line}")
        print(
            f"  {'policy':8s} {'p50 ms':>9s} {'p95 ms':>9s} {'p99 ms':>9s} {'layer a2a p95':>14s} {'busiest/mean':>13s} {'p95 vs static':>14s}"
        )
        for name, s in r["policies"].items():
            print(
                f"  {name:8s} {s['p50_ms']:9.1f} {s['p95_ms']:9.1f} {s['p99_ms']:9.1f} {s['layer_a2a_p95_ms']:14.1f} {s['busiest_over_mean']:13.2f} "
                f"{r['p95_speedup_vs_static'][name]:13.2f}x"
            )
        cap = r["oracle_gain_captured_p95"]
        est = r["estimator"]
        cost = r["scheduling_cost_ms"]
        print(
            f"  lina captures {cap * 100 if cap is not None else float('nan'):.0f}% of the oracle's p95 gain over static (target >= 70%); "
            f"estimator top-2 accuracy {est['top2_accuracy'] * 100:.1f}% at l={est['path_len']} (paper 54-60%), "
            f"re-plan rate {est['replan_rate'] * 100:.0f}% (paper 23-32%)"
        )
        print(
            f"  scheduling cost per layer{'' if reg.get('dilation', 1.0) == 1.0 else ' (this host, not dilated)'}: "
            f"phase 1 {cost['phase1_per_layer_median']:.2f} ms, phase 2 {cost['phase2_per_layer_median']:.2f} ms "
            f"(paper: about {PAPER['phase_cost_ms']} ms per phase, {PAPER['phase2_noop_ms']} ms when phase 2 finds nothing to do)"
        )
    print(
        f"\npaper: lina p95 {PAPER['p95_speedup_avg']}x better than DeepSpeed (static) on average, at 4-5.5x expert skew"
    )


def plot_cdf(entries: list[dict], raw: dict[str, dict], path: Path) -> None:
    plt = pyplot(path)
    if plt is None:
        return

    fig, axes = plt.subplots(1, len(entries), figsize=(6 * len(entries), 4), squeeze=False)
    for ax, r in zip(axes[0], entries):
        for name in POLICIES:
            lat = sorted(b["latency_s"] * 1e3 for b in raw[r["trace"]][name]["batches"])
            ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=name, drawstyle="steps-post")
        ax.set_xlabel("batch latency (ms)")
        ax.set_ylabel("CDF")
        ax.set_title(f"{r['trace']} (link {r['regime']['link']}, skew {r['regime']['skew']:.1f})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def emulated_rate(link_bps: int, dilation: float) -> int:
    """The emulated link of a real one under time dilation: link / K, to the kbit/s."""
    return int(link_bps / dilation) // 1000 * 1000


def _compute_text(args) -> str:
    return "real" if args.compute == "real" else f"{args.compute} time x {args.dilation:g}"


def check_compute(args) -> None:
    """--compute, --dilation and --link checked before anything starts (ConfigError)."""
    from lina.devices import device_from

    resolve_cluster(args)
    if not args.dilation > 0:
        raise ConfigError("dilation", f"{args.dilation} must be > 0", "use 1 (no dilation) or e.g. 100")
    if args.compute == "real":
        if args.dilation != 1.0:
            raise ConfigError(
                "dilation",
                "time dilation needs a device-time compute mode",
                "add --compute a100 (or another device), or drop --dilation",
            )
    else:
        device_from(args.compute)
    _emulate_spec(args)


def _emulate_spec(args) -> EmulateSpec:
    """The emulated cluster: links at the real rate / dilation (ConfigError outside tc's range)."""
    return EmulateSpec(
        hosts=args.hosts,
        workers_per_host=args.workers_per_host,
        link_bps=emulated_rate(parse_rate(args.link), args.dilation),
        intra_bps=emulated_rate(args.intra_bps, args.dilation) if args.intra_bps else 0,
    )


def startup_check(args):
    """The start-up dilation check of a device-time run on this cluster shape (None for real
    compute or with --skip-dilation-check); ConfigError when the dilation is too small."""
    if args.compute == "real" or args.skip_dilation_check:
        return None
    from lina.cluster.dilation_check import startup_check as check

    emulate = f"hosts={args.hosts},link={args.link},workers_per_host={args.workers_per_host}"
    if args.intra_bps:
        emulate += f",intra={format_rate(args.intra_bps)}"
    found = check(emulate, args.dilation, "lina bench infer", chosen_for_the_user=args.dilation_chosen_by_cluster)
    args.dilation = found.dilation
    return found


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.batches, args.warmup, args.layers, args.tokens_per_rank, args.d_model, args.d_ff = 4, 1, 8, 64, 128, 256
    check_compute(args)
    fitted = getattr(args, "fitted_cluster", None)
    if fitted is not None:
        for line in cluster_lines(cluster_regime(fitted, args.dilation)):
            print(f"lina bench infer: {line}", flush=True)
    args.dilation_check = startup_check(args)
    json_path = Path(args.json)
    out = json_path.parent
    out.mkdir(parents=True, exist_ok=True)
    traces: dict[str, RoutingTrace] = {}
    if args.trace:
        traces[Path(args.trace).stem] = load_trace(args.trace)
    else:
        if args.model:
            from lina.data.corpus import load_corpus, sample_batch
            from lina.infer.model_adapter import load_trained_model, record_routing

            model = load_trained_model(args.model)
            corpus = load_corpus("", 1.0)
            batches = [sample_batch(corpus.val, 8, model.cfg.seq_len, 1234, i, 0)[0] for i in range(6)]
            traces["own-model"] = record_routing(model, batches, f"lina MoE GPT from {args.model}")
        else:
            traces["own-model"] = train_model_trace(out, args.quick)
        if Path(args.mixtral_trace).exists():
            traces["mixtral"] = load_trace(args.mixtral_trace)
        else:
            print(f"note: {args.mixtral_trace} not found; serving only the own model's trace (pass --mixtral-trace)")
    entries = [serve_trace(args, name, trace, out) for name, trace in traces.items()]
    raw = {e["trace"]: json.loads((out / e["trace"] / "result.json").read_text()) for e in entries}
    result = {"runs": entries, "paper": PAPER}
    first = entries[0]
    result.update({k: first[k] for k in ("policies", "p95_speedup_vs_static", "estimator", "regime")})
    result["provenance"] = provenance()
    json_path.write_text(json.dumps(result, indent=2))
    plot_cdf(entries, raw, json_path.with_suffix(".png"))
    print_report(entries)
    print(f"\nwrote {json_path}, {json_path.with_suffix('.png')}")
    return 0

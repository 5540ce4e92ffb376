"""``lina bench contention``: how much a concurrent allreduce slows an all-to-all (paper Fig. 3).

On H emulated hosts (1 Gloo worker each, links limited by tc), every pair times one
all-to-all alone and one launched right after an async allreduce on a second process
group over the same ranks. Per pair, an all-to-all's time is the slowest rank's; the
slowdown is contended / alone. Prints and saves the distribution (median, p95, max) with
a CDF plot next to the JSON, beside the paper's figures (median > 1.83x, worst 4.14x on
DeepSpeed-MoE, 16 A100, 100 Gb/s InfiniBand).

The lead's ``lina bench`` wires ``add_arguments`` / ``run`` as its ``contention``
sub-benchmark; ``python -m lina.bench.contention`` runs it directly.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from lina.bench.plan import ContentionPlan
from lina.cluster import netns
from lina.cluster.emulate import EmulatedCluster, EmulateSpec, parse_duration_us, parse_rate
from lina.cluster.hostlaunch import run_on_cluster
from lina.errors import ConfigError, LinaError
from lina.obs.provenance import provenance

PAPER = {
    "median_slowdown_at_least": 1.83,
    "max_slowdown": 4.14,
    "setting": "DeepSpeed-MoE backward all-to-alls vs concurrent gradient allreduce, 16 A100, 100 Gb/s "
    "InfiniBand (1,500 ops)",
}
DEFAULT_A2A_ELEMS = 8 * 128 * 2 * 128  # 8 seqs x 128 tokens x top-2 x d_model 128 float32 = 1 MiB per rank
DEFAULT_ALLREDUCE_ELEMS = 1024 * 1024  # 4 MiB of gradients
QUICK_PAIRS, FULL_PAIRS = 20, 200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lina bench contention``."""
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_PAIRS} pairs instead of {FULL_PAIRS}")
    parser.add_argument("--pairs", type=int, default=None, help="measured alone/contended pairs (overrides --quick)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured pairs first")
    parser.add_argument(
        "--json", default="runs/bench/contention.json", help="result JSON; the CDF plot goes next to it"
    )
    parser.add_argument("--link", default="200mbit", help="each host's link rate, each way (kbit/mbit/gbit)")
    parser.add_argument("--queue", default="100ms", help="link queue depth, in time at the link rate")
    parser.add_argument(
        "--share", default="peer", choices=("peer", "fifo"),
        help="link sharing: round-robin between peer hosts, or one FIFO per direction like a switch port",
    )  # fmt: skip
    parser.add_argument("--hosts", type=int, default=4, help="emulated hosts, one worker each")
    parser.add_argument(
        "--a2a-elems", type=int, default=DEFAULT_A2A_ELEMS,
        help="float32 values each rank sends per all-to-all; the default is 8 seqs x 128 tokens x top-2 "
             "x d_model 128 (1 MiB)",
    )  # fmt: skip
    parser.add_argument(
        "--allreduce-elems", type=int, default=DEFAULT_ALLREDUCE_ELEMS,
        help="float32 values in the concurrent allreduce; the default is 4 MiB",
    )  # fmt: skip
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up after this many seconds; None: derived from sizes and link rate",
    )


def run(args: argparse.Namespace) -> int:
    """Build the emulated cluster, run the workers, summarize, print, save JSON and PNG."""
    pairs = args.pairs if args.pairs is not None else (QUICK_PAIRS if args.quick else FULL_PAIRS)
    if pairs < 2:
        raise ConfigError("--pairs", f"{pairs}", "use at least 2 pairs")
    if args.a2a_elems < args.hosts or args.allreduce_elems < 1:
        raise ConfigError("--a2a-elems", f"{args.a2a_elems}", f"send at least one value per rank ({args.hosts})")
    spec = EmulateSpec(
        hosts=args.hosts,
        link_bps=parse_rate(args.link, field="--link"),
        workers_per_host=1,
        queue_ms=parse_duration_us(args.queue, field="--queue") / 1e3,
        share=args.share,
    )
    netns.require_support(alternative=None)
    out_json = Path(args.json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    a2a_bytes, ar_bytes = 4 * args.a2a_elems, 4 * args.allreduce_elems
    bound_s = link_bound_s(a2a_bytes, spec.hosts, spec.link_bps)
    print(
        f"contention: {spec.hosts} emulated hosts x 1 Gloo worker, link {spec.link} each way ({spec.share}"
        f" sharing, queue {spec.queue_ms:g} ms); all-to-all"
        f" {a2a_bytes / 2**20:.2f} MiB per rank (link-rate bound {bound_s * 1e3:.1f} ms), concurrent allreduce"
        f" {ar_bytes / 2**20:.2f} MiB on a second process group; {pairs} pairs after {args.warmup} warm-up",
        flush=True,
    )
    timeout = args.timeout or 120.0 + (pairs + args.warmup) * 20 * (bound_s + ar_bytes * 8 * 2 / spec.link_bps)
    with tempfile.TemporaryDirectory(prefix="lina-contention-") as tmp:
        raw_path = Path(tmp) / "raw.json"
        plan = ContentionPlan(
            pairs=pairs,
            warmup=args.warmup,
            a2a_elems=args.a2a_elems,
            allreduce_elems=args.allreduce_elems,
            out=str(raw_path),
            timeline_dir=str(out_json.resolve().with_suffix("")) + "_timeline",
        )
        worker_args = [str(plan.save(Path(tmp) / "plan.json"))]
        with EmulatedCluster(spec, alternative=None) as cluster:
            prefix = cluster.prefix
            run_on_cluster(cluster, "lina.bench.contention_worker", worker_args, 1, timeout_s=timeout)
            counters = cluster.link_counters()
        if not raw_path.exists():
            raise LinaError("the contention workers finished without writing their results")
        raw = json.loads(raw_path.read_text())
    result = summarize(raw["alone_s"], raw["contended_s"], raw["allreduce_s"])
    result.update(
        benchmark="contention",
        hosts=spec.hosts,
        workers_per_host=1,
        link=spec.link,
        link_bps=spec.link_bps,
        queue_ms=spec.queue_ms,
        share=spec.share,
        emulate=str(spec),
        cluster=prefix,
        backend="gloo",
        a2a_bytes_per_rank=4 * raw["a2a_elems"],
        allreduce_bytes=ar_bytes,
        a2a_link_bound_s=bound_s,
        pairs=pairs,
        warmup=args.warmup,
        link_counters=counters,
        link_drops=sum(c[d]["drops"] for c in counters for d in ("up", "down")),
        link_packets=sum(c[d]["packets"] for c in counters for d in ("up", "down")),
        paper=PAPER,
        timeline_dir=raw["timeline_dir"],
        plot=str(out_json.with_suffix(".png")),
    )
    result["provenance"] = provenance()
    out_json.write_text(json.dumps(result, indent=1))
    plot_cdf(result, Path(result["plot"]))
    print_report(result)
    print(f"wrote {out_json} and {result['plot']}")
    return 0


def link_bound_s(a2a_bytes_per_rank: int, world: int, link_bps: int) -> float:
    """Time an all-to-all needs at full link rate: each rank sends (world-1)/world of its data off-host."""
    return a2a_bytes_per_rank * (world - 1) / world * 8 / link_bps


def _stats(values: list[float]) -> dict:
    xs = sorted(v for v in values if not math.isnan(v))
    if not xs:
        raise LinaError("no measurements came back from the contention workers")
    return {
        "median": _quantile(xs, 0.5),
        "p95": _quantile(xs, 0.95),
        "min": xs[0],
        "max": xs[-1],
        "mean": sum(xs) / len(xs),
    }


def _quantile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list."""
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(alone: list[list[float]], contended: list[list[float]], allreduce: list[list[float]]) -> dict:
    """Slowdown distribution from per-rank durations.

    Args:
        alone: ``[ranks][pairs]`` seconds of the all-to-all alone.
        contended: ``[ranks][pairs]`` seconds of the all-to-all with the allreduce in flight.
        allreduce: ``[ranks][pairs]`` seconds from launching the allreduce to its completion.
    Returns:
        dict with ``alone_s`` / ``contended_s`` / ``allreduce_s`` / ``slowdown`` stats
        (median, p95, min, max, mean), ``ratio_of_medians`` and the per-pair samples.
    """
    pairs = len(alone[0])
    a = [max(r[i] for r in alone) for i in range(pairs)]  # a collective ends with its slowest rank
    c = [max(r[i] for r in contended) for i in range(pairs)]
    ar = [max(r[i] for r in allreduce) for i in range(pairs)]
    slow = [ci / ai for ai, ci in zip(a, c) if ai > 0 and not (math.isnan(ai) or math.isnan(ci))]
    sa, sc = _stats(a), _stats(c)
    return {
        "alone_s": sa,
        "contended_s": sc,
        "allreduce_s": _stats(ar),
        "slowdown": _stats(slow),
        "ratio_of_medians": sc["median"] / sa["median"],
        "samples": {"alone_s": a, "contended_s": c, "allreduce_s": ar, "slowdown": slow},
    }


def print_report(result: dict) -> None:
    a, c, s = result["alone_s"], result["contended_s"], result["slowdown"]
    ms = lambda x: f"{x * 1e3:.1f} ms"  # noqa: E731
    print(
        f"regime: {result['hosts']} hosts, link {result['link']} each way (tc, {result['share']} sharing, queue"
        f" {result['queue_ms']:g} ms), Gloo over TCP"
    )
    print(
        f"  all-to-all alone:          median {ms(a['median'])}  p95 {ms(a['p95'])}  min "
        f"{ms(a['min'])}  max {ms(a['max'])}"
        f"  (link-rate bound {ms(result['a2a_link_bound_s'])})"
    )
    print(
        f"  all-to-all with allreduce: median {ms(c['median'])}  p95 {ms(c['p95'])}  min "
        f"{ms(c['min'])}  max {ms(c['max'])}"
    )
    print(
        f"  slowdown per pair (ours):  median {s['median']:.2f}x  p95 {s['p95']:.2f}x  max {s['max']:.2f}x"
        f"  (min {s['min']:.2f}x; ratio of medians {result['ratio_of_medians']:.2f}x, "
        f"{len(result['samples']['slowdown'])} pairs)"
    )
    print(
        f"  link queue drops over the run: {result['link_drops']} of {result['link_packets']} packets"
        + (
            "  (drops stall TCP for a retransmission timeout; a deeper --queue avoids them)"
            if result["link_drops"]
            else ""
        )
    )
    print(
        f"  slowdown (paper, Fig. 3):  median > {PAPER['median_slowdown_at_least']:.2f}x  max "
        f"{PAPER['max_slowdown']:.2f}x"
        f"  ({PAPER['setting']})"
    )


def plot_cdf(result: dict, path: Path) -> None:
    """CDF of per-pair slowdowns (paper's median and worst marked) and of both all-to-all times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    slow = sorted(result["samples"]["slowdown"])
    ys = [(i + 1) / len(slow) for i in range(len(slow))]
    ax1.step(slow, ys, where="post", label="ours (per pair)")
    ax1.axvline(PAPER["median_slowdown_at_least"], color="tab:red", ls="--", label="paper median (>1.83x)")
    ax1.axvline(PAPER["max_slowdown"], color="tab:red", ls=":", label="paper worst (4.14x)")
    ax1.axhline(0.5, color="grey", lw=0.5)
    ax1.set_xlabel("all-to-all slowdown with a concurrent allreduce (x)")
    ax1.set_ylabel("CDF")
    ax1.set_title(f"{result['hosts']} hosts, link {result['link']} ({result['share']} sharing)")
    ax1.legend(loc="lower right", fontsize=8)
    for key, label in (("alone_s", "alone"), ("contended_s", "with allreduce")):
        xs = sorted(v * 1e3 for v in result["samples"][key])
        ax2.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
    ax2.axvline(result["a2a_link_bound_s"] * 1e3, color="grey", ls="--", label="link-rate bound")
    ax2.set_xlabel("all-to-all time (ms), slowest rank")
    ax2.set_ylabel("CDF")
    ax2.set_title(
        f"all-to-all {result['a2a_bytes_per_rank'] / 2**20:.2f} MiB/rank, allreduce "
        f"{result['allreduce_bytes'] / 2**20:.1f} MiB"
    )
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lina.bench.contention",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except LinaError as err:
        print(f"lina bench contention: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    raise SystemExit(main())

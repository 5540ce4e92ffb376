"""Tables and summaries of simulated runs, with the paper's numbers beside ours where they exist."""

from __future__ import annotations

import statistics

from lina.sim import paper
from lina.sim.runner import ScenarioRun


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def train_table(run: ScenarioRun) -> str:
    """One row per policy: step, a2a (share), backward a2a, allreduce, exposed comm, speedup."""
    sc = run.scenario
    base = run.baseline
    lines = [
        f"{sc.name}: {sc.description}",
        f"  cluster: {sc.cluster.describe()}, NVLink {sc.cluster.nvlink_gbps:g} Gb/s; model: {sc.model.describe()}",
    ]
    if base is not None:
        lines.append(
            f"  regime: link {sc.cluster.link_gbps:g} Gb/s, ddp-overlap all-to-all share {base.a2a_share:.1%}; "
            f"lower bound of the synchronous schedule (every a2a alone, allreduce hidden) {_ms(run.lower_bound.step_s)} ms"
        )
    header = (
        f"  {'policy':<15}{'step ms':>10}{'a2a ms':>10}{'a2a %':>7}{'bwd a2a':>9}{'allred.':>9}{'exposed':>9}"
        f"{'speedup':>9}{'pack':>6}"
    )
    lines += [header, "  " + "-" * (len(header) - 2)]
    for name, r in run.results.items():
        speed = f"{r.speedup:.2f}x" if r.speedup is not None else "-"
        lines.append(
            f"  {name:<15}{_ms(r.step_s):>10}{_ms(r.a2a_s):>10}{r.a2a_share:>7.1%}{_ms(r.bwd_a2a_s):>9}"
            f"{_ms(r.allreduce_s):>9}{_ms(r.exposed_comm_s):>9}{speed:>9}{r.pack:>6}"
        )
    packed = run.results.get("lina+packing")
    if packed is not None and packed.pack_trace:
        stop = packed.pack_trace[-1].get("stop", "")
        lines.append(f"  packing: x{packed.pack} (expert-parallel group {packed.ep} GPUs); stopped: {stop}")
    return "\n".join(lines)


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def testbed_summary(runs: list[ScenarioRun]) -> list[dict]:
    """Our testbed numbers beside the paper's: rows of ``{metric, ours, paper}`` (strings)."""

    def speed(r, policy):
        return r.results[policy].speedup if policy in r.results else None

    rows = []
    shares = [r.baseline.a2a_share for r in runs if r.baseline]
    rows.append(
        {
            "metric": "ddp-overlap all-to-all share of step (mean)",
            "ours": f"{_mean(shares):.1%}",
            "paper": f"{paper.A2A_SHARE_AVG:.1%}",
        }
    )
    by_e: dict[int, list[ScenarioRun]] = {}
    for r in runs:
        by_e.setdefault(r.scenario.model.experts, []).append(r)
    for e in sorted(by_e):
        s = _mean([r.baseline.a2a_share for r in by_e[e] if r.baseline])
        ref = paper.A2A_SHARE_BY_EXPERTS.get(e)
        rows.append({"metric": f"  a2a share, {e} experts", "ours": f"{s:.1%}", "paper": f"{ref:.1%}" if ref else "-"})
    packed = [x for x in (speed(r, "lina+packing") for r in runs) if x is not None]
    if packed:
        rows.append(
            {
                "metric": "lina+packing speedup vs ddp-overlap (mean)",
                "ours": f"{_mean(packed):.2f}x",
                "paper": f"{paper.SPEEDUP_AVG:.2f}x",
            }
        )
        rows.append(
            {
                "metric": "lina+packing speedup (max)",
                "ours": f"{max(packed):.2f}x",
                "paper": f"{paper.SPEEDUP_MAX:.2f}x",
            }
        )
        for e in sorted(by_e):
            xs = [x for x in (speed(r, "lina+packing") for r in by_e[e]) if x is not None]
            ref = paper.SPEEDUP_BY_EXPERTS.get(e)
            rows.append(
                {
                    "metric": f"  lina+packing, {e} experts (mean)",
                    "ours": f"{_mean(xs):.2f}x",
                    "paper": f"{ref:.2f}x" if ref else "-",
                }
            )
    for policy, label, ref in (
        ("lina", "lina without packing (range)", "{:.2f}-{:.2f}x".format(*paper.PRIORITY_PARTITION_RANGE)),
        (
            "lina-partition",
            "priority + partitioning, no pipelining (range)",
            "{:.2f}-{:.2f}x".format(*paper.PRIORITY_PARTITION_RANGE),
        ),
        ("lina-priority", "priority only (mean)", f"{paper.PRIORITY_ONLY_AVG:.2f}x"),
        ("tutel", "tutel (mean)", "close to ddp-overlap"),
    ):
        xs = [x for x in (speed(r, policy) for r in runs) if x is not None]
        if not xs:
            continue
        ours = f"{min(xs):.2f}-{max(xs):.2f}x" if "range" in label else f"{_mean(xs):.2f}x"
        rows.append({"metric": label, "ours": ours, "paper": ref})
    for e in sorted(by_e):
        xs = [
            r.baseline.bwd_a2a_s / r.results["lina+packing"].bwd_a2a_s
            for r in by_e[e]
            if r.baseline and "lina+packing" in r.results and r.results["lina+packing"].bwd_a2a_s > 0
        ]
        ref = paper.BWD_A2A_SPEEDUP_BY_EXPERTS.get(e)
        if xs:
            rows.append(
                {
                    "metric": f"backward a2a time ddp-overlap/lina+packing, {e} experts",
                    "ours": f"{_mean(xs):.2f}x",
                    "paper": f"{ref:.2f}x" if ref else "-",
                }
            )
    for policy, ref in (
        ("lina", paper.COMPUTE_BUSY_IN_A2A_NO_PACKING),
        ("lina+packing", paper.COMPUTE_BUSY_IN_A2A_PACKING),
    ):
        xs = [
            r.results[policy].compute_busy_in_a2a for r in runs if policy in r.results and r.results[policy].a2a_s > 0
        ]
        if xs:
            rows.append(
                {
                    "metric": f"compute busy while a2a in flight, {policy}",
                    "ours": f"{_mean(xs):.0%}",
                    "paper": f"{ref[0]:.0%}-{ref[1]:.0%}",
                }
            )
    return rows


def summary_table(rows: list[dict], title: str) -> str:
    width = max(len(r["metric"]) for r in rows) + 2
    lines = [title, f"  {'metric':<{width}}{'simulated (ours)':>18}   {paper.PAPER}", "  " + "-" * (width + 40)]
    lines += [f"  {r['metric']:<{width}}{r['ours']:>18}   {r['paper']}" for r in rows]
    return "\n".join(lines)

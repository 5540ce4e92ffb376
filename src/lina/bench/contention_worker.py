"""Worker of ``lina bench contention``: one all-to-all alone vs. with a concurrent allreduce.

Run by torchrun on every emulated host (see :mod:`lina.bench.contention`). Each rank:

1. joins the default Gloo group (used for the all-to-all and barriers) and a second Gloo
   group over the same ranks (used only for the allreduce), so the two collectives run on
   separate connections and really share each host's link;
2. for each pair, times ``all_to_all_single`` on ``[a2a_elems]`` float32 alone, and again
   right after launching an async ``all_reduce`` of ``[allreduce_elems]`` float32 on the
   second group (the order within a pair alternates: alone first on even pairs, contended
   first on odd ones, so drift does not favour either);
3. records every collective as a timeline span, saves its timeline as JSONL, and rank 0
   writes the per-rank durations of all pairs to the plan's ``out``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lina.bench.plan import ContentionPlan
from lina.cluster.teardown import leave_distributed
from lina.errors import LinaError
from lina.obs import schema
from lina.obs.timeline import Timeline


def measure(args: ContentionPlan, rank: int, world: int, ar_group) -> Timeline:
    """Run warm-up and measured pairs; returns this rank's timeline (spans ``a2a`` and ``allreduce``)."""
    tl = Timeline(rank)
    elems = args.a2a_elems - args.a2a_elems % world  # equal splits
    send = torch.randn(elems)
    recv = torch.empty(elems)
    grad = torch.randn(args.allreduce_elems)
    total = args.warmup + args.pairs
    every = max(1, args.pairs // 20)
    for i in range(total):
        pair = i - args.warmup
        modes = ("alone", "contended") if i % 2 == 0 else ("contended", "alone")
        took = {}
        for mode in modes:
            dist.barrier()
            work = None
            if mode == "contended":
                ar_start = tl.now()
                work = dist.all_reduce(grad, group=ar_group, async_op=True)
            start = tl.now()
            dist.all_to_all_single(recv, send)
            end = tl.now()
            tl.record("a2a", "a2a", start, end, kind=schema.ALLTOALL, mode=mode, pair=pair)
            took[mode] = end - start
            if work is not None:
                work.wait()
                tl.record("allreduce", "allreduce", ar_start, tl.now(), kind=schema.ALLREDUCE, pair=pair)
        if rank == 0 and pair >= 0 and (pair % every == 0 or pair == args.pairs - 1):
            a, c = took["alone"], took["contended"]
            print(
                f"pair {pair + 1}/{args.pairs}: a2a alone {a * 1e3:.1f} ms, with allreduce {c * 1e3:.1f} ms"
                f" ({c / a:.2f}x on rank 0)",
                flush=True,
            )
    return tl


def per_pair(tl: Timeline, kind: str, mode: str | None, pairs: int) -> list[float]:
    """Durations (s) of the measured spans of ``kind`` (of ``mode``), indexed by pair."""
    out = [float("nan")] * pairs
    for span in tl.spans():
        pair = span.args.get("pair", -1)
        if span.kind == kind and 0 <= pair < pairs and (mode is None or span.args.get("mode") == mode):
            out[pair] = span.dur_s
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m lina.bench.contention_worker PLAN.json`` (a :class:`ContentionPlan` file)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise LinaError(
            "usage: python -m lina.bench.contention_worker PLAN.json (the plan lina bench contention wrote)"
        )
    args = ContentionPlan.load(argv[0])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ar_group = dist.new_group(backend="gloo")
    tl = measure(args, rank, world, ar_group)
    Path(args.timeline_dir).mkdir(parents=True, exist_ok=True)
    tl.save_jsonl(Path(args.timeline_dir) / f"contention.rank{rank}.jsonl")
    mine = torch.tensor(
        [per_pair(tl, schema.ALLTOALL, "alone", args.pairs), per_pair(tl, schema.ALLTOALL, "contended", args.pairs),
         per_pair(tl, schema.ALLREDUCE, None, args.pairs)],
        dtype=torch.float64,
    )  # fmt: skip
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    if rank == 0:
        raw = {
            "world_size": world,
            "a2a_elems": args.a2a_elems - args.a2a_elems % world,
            "allreduce_elems": args.allreduce_elems,
            "pairs": args.pairs,
            "warmup": args.warmup,
            "alone_s": [g[0].tolist() for g in gathered],  # [rank][pair]
            "contended_s": [g[1].tolist() for g in gathered],
            "allreduce_s": [g[2].tolist() for g in gathered],
            "timeline_dir": str(args.timeline_dir),
        }
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(raw))
        os.replace(tmp, args.out)
    dist.barrier()
    leave_distributed()
    return 0


if __name__ == "__main__":
    from lina.cluster.failures import run_recorded

    raise SystemExit(run_recorded(main))

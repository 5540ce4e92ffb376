"""The communication scheduler with real Gloo collectives over 2-4 spawned processes.

One 4-rank job (module fixture) runs gradients through the scheduler as allreduce
micro-ops, interleaved at random *per rank* with all-to-alls (a separate process group),
holds and compute pauses; every rank writes its spans and results, and the tests below
check them: numerics, priority, hold, credit, FIFO order, CPU overhead. Two 2-rank jobs
check that a peer that dies or stalls makes ``flush()`` raise instead of hanging.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import random
import time
from pathlib import Path

import pytest

from lina.obs.timeline import load_jsonl

pytestmark = pytest.mark.slow

WORLD = 4
CREDIT = 2
CHUNK_BYTES = 16 * 1024
N_A2A = 12


def _init(rank: int, world: int, init_file: str):
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # keep the job on 127.0.0.1
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    return dist, dist.new_group(list(range(world)))  # allreduce group; all-to-all uses WORLD


def _grads(rank: int):
    """Same shapes on every rank, integer-valued float32 that differ per rank."""
    import torch

    shapes = [(300, 257), (1000,), (64, 64, 8), (7,), (513, 129), (40000,), (3, 3)]
    gen = torch.Generator().manual_seed(100 + rank)
    return [(f"p{i}", torch.randint(-1000, 1000, s, generator=gen).float()) for i, s in enumerate(shapes)]


def _interleave_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch

    from lina.comm.partition import partition
    from lina.comm.scheduler import CommScheduler, SchedulerConfig
    from lina.obs.timeline import Timeline

    dist, ar_group = _init(rank, world, init_file)
    grads = _grads(rank)
    reference = torch.cat([g.reshape(-1) for _, g in grads])
    dist.all_reduce(reference, group=ar_group)  # one big allreduce to compare with

    # Same events on every rank, in a per-rank random interleaving: gradients keep their
    # order, all-to-alls keep theirs; holds and compute pauses land anywhere.
    rng = random.Random(7 + rank)
    events = [("grad", i) for i in range(len(grads))] + [("a2a", j) for j in range(N_A2A)]
    order, gi, ai = [], 0, 0
    while gi < len(grads) or ai < N_A2A:
        take_grad = ai == N_A2A or (gi < len(grads) and rng.random() < len(grads) / (len(grads) + N_A2A))
        order.append(events[gi] if take_grad else events[len(grads) + ai])
        gi, ai = (gi + 1, ai) if take_grad else (gi, ai + 1)
        if rng.random() < 0.3:
            order.append(("hold", None))
        if rng.random() < 0.5:
            order.append(("compute", rng.uniform(0.0, 0.004)))

    tl = Timeline(rank)
    config = SchedulerConfig(credit=CREDIT, drain=rank % 2 == 0, drain_timeout_s=0.02, timeout_s=20.0)
    a2a_ok = True
    with CommScheduler(tl, config) as sched:
        for kind, arg in order:
            if kind == "grad":
                name, g = grads[arg]
                for k, chunk in enumerate(partition(g, CHUNK_BYTES)):
                    sched.submit_allreduce(
                        name,
                        chunk.numel() * 4,
                        lambda c=chunk: dist.all_reduce(c, group=ar_group, async_op=True),
                        index=k,
                    )
            elif kind == "a2a":
                send = torch.arange(world * 2000, dtype=torch.float32) + 1e5 * rank + arg
                recv = torch.empty_like(send)
                with sched.a2a(f"a2a{arg}", send.numel() * 4):
                    dist.all_to_all_single(recv, send)
                want = torch.cat(
                    [torch.arange(2000, dtype=torch.float32) + 2000 * rank + 1e5 * p + arg for p in range(world)]
                )
                a2a_ok = a2a_ok and torch.equal(recv, want)
            elif kind == "hold":
                sched.hold()
            else:
                time.sleep(arg)
        sched.flush()
        stats = sched.stats()
    result = torch.cat([g.reshape(-1) for _, g in grads])
    tl.save_jsonl(Path(out_dir) / f"spans{rank}.jsonl")
    (Path(out_dir) / f"result{rank}.json").write_text(
        json.dumps(
            {
                "bit_identical": bool(torch.equal(result, reference)),
                "a2a_ok": bool(a2a_ok),
                "n_chunks": sum(len(partition(g, CHUNK_BYTES)) for _, g in grads),
                "done": stats.allreduce_done,
                "max_in_flight": stats.max_in_flight,
                "own_cpu_per_op_s": stats.own_cpu_per_op_s,
                "thread_cpu_s": stats.thread_cpu_s,
                "launch_cpu_s": stats.launch_cpu_s,
                "callback_cpu_s": stats.callback_cpu_s,
            }
        )
    )
    dist.barrier()
    dist.destroy_process_group()


def _peer_dies_worker(rank: int, world: int, init_file: str, out_dir: str, stall: bool) -> None:
    import torch

    from lina.comm.scheduler import CommError, CommScheduler, CommTimeoutError, SchedulerConfig
    from lina.obs.timeline import Timeline

    dist, ar_group = _init(rank, world, init_file)
    chunks = [torch.ones(4096) for _ in range(6)]
    with CommScheduler(Timeline(rank), SchedulerConfig(timeout_s=20.0)) as sched:
        for k, c in enumerate(chunks[:3]):
            sched.submit_allreduce("w", 16384, lambda c=c: dist.all_reduce(c, group=ar_group, async_op=True), index=k)
        sched.flush()
        dist.barrier()
        if rank == 1:  # the peer stops participating: gone, or alive but stuck
            if stall:
                time.sleep(4.0)
            os._exit(3)
        for k, c in enumerate(chunks[3:]):
            sched.submit_allreduce(
                "w", 16384, lambda c=c: dist.all_reduce(c, group=ar_group, async_op=True), index=3 + k
            )
        t0 = time.perf_counter()
        outcome = "returned"
        try:
            sched.flush(timeout_s=1.5 if stall else 10.0)
        except CommTimeoutError:
            outcome = "timeout"
        except CommError as err:
            outcome = f"error: {err}"
        elapsed = time.perf_counter() - t0
        (Path(out_dir) / "rank0.json").write_text(
            json.dumps({"outcome": outcome, "elapsed_s": elapsed, "first_ok": bool(chunks[0][0] == 2)})
        )
    os._exit(0)  # the group is broken; skip a teardown that would wait for the dead peer


def _run_ranks(target, world: int, tmp_path: Path, *extra, timeout_s: float = 20.0) -> list[int | None]:
    ctx = mp.get_context("spawn")
    init_file = tmp_path / "init"
    procs = [ctx.Process(target=target, args=(r, world, str(init_file), str(tmp_path), *extra)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory):
    out = tmp_path_factory.mktemp("interleave")
    t0 = time.perf_counter()
    codes = _run_ranks(_interleave_worker, WORLD, out, timeout_s=45.0)
    elapsed = time.perf_counter() - t0
    assert codes == [0] * WORLD, f"ranks exited {codes} after {elapsed:.1f} s (None = deadlocked/hung)"
    results = [json.loads((out / f"result{r}.json").read_text()) for r in range(WORLD)]
    spans = [load_jsonl(out / f"spans{r}.jsonl") for r in range(WORLD)]
    return results, spans


def test_micro_op_allreduce_bit_identical_to_one_big_allreduce(interleaved):
    """Integer-valued float32 sums are exact in any order, so equality is bitwise
    (torch.equal) against one allreduce of the concatenated gradients."""
    results, _ = interleaved
    for r, res in enumerate(results):
        assert res["bit_identical"], f"rank {r}: micro-op allreduce differs from one big allreduce"
        assert res["a2a_ok"], f"rank {r}: all-to-all data wrong"
        assert res["done"] == res["n_chunks"] > 30


def _a2a_windows(spans):
    """[entry, end] of each all-to-all: waiting (drain) and running."""
    return [(s.start_s - s.args["queue_wait_s"], s.end_s) for s in spans if s.name.startswith("a2a-slot:")]


def test_no_allreduce_launch_while_a2a_waits_or_runs(interleaved):
    _, spans = interleaved
    contended = 0
    for r, rank_spans in enumerate(spans):
        ars = [s for s in rank_spans if s.cat == "allreduce"]
        windows = _a2a_windows(rank_spans)
        assert len(windows) == N_A2A
        for ar in ars:
            for lo, hi in windows:
                assert not lo <= ar.start_s <= hi, f"rank {r}: {ar.name}[{ar.args['index']}] launched during an a2a"
        # the rule was exercised: some all-to-all began while a micro-op was in flight
        contended += sum(any(a.start_s < lo < a.end_s for a in ars) for lo, _ in windows)
    assert contended > 0


def test_no_allreduce_launch_after_hold_until_next_a2a_completes(interleaved):
    _, spans = interleaved
    checked = 0
    for r, rank_spans in enumerate(spans):
        windows = sorted(_a2a_windows(rank_spans))
        launches = [s.start_s for s in rank_spans if s.cat == "allreduce"]
        for hold in (s for s in rank_spans if s.name == "hold"):
            nxt = [w for w in windows if w[0] > hold.start_s]
            if not nxt:
                continue  # released by flush at the end
            released = nxt[0][1]
            assert not any(hold.start_s <= t <= released for t in launches), f"rank {r}: launch during a hold"
            checked += 1
    assert checked > 0


def test_credit_window_respected(interleaved):
    results, spans = interleaved
    for r, rank_spans in enumerate(spans):
        edges = sorted(
            [(s.start_s, 1) for s in rank_spans if s.cat == "allreduce"]
            + [(s.end_s, -1) for s in rank_spans if s.cat == "allreduce"],
            key=lambda e: (e[0], e[1]),
        )
        level = peak = 0
        for _, d in edges:
            level += d
            peak = max(peak, level)
        assert peak <= CREDIT, f"rank {r}: {peak} allreduce micro-ops in flight"
        assert results[r]["max_in_flight"] <= CREDIT


def test_fifo_launch_order_same_on_every_rank(interleaved):
    _, spans = interleaved
    orders = []
    for rank_spans in spans:
        ars = sorted((s for s in rank_spans if s.cat == "allreduce"), key=lambda s: s.start_s)
        assert [s.args["seq"] for s in ars] == sorted(s.args["seq"] for s in ars)
        orders.append([(s.name, s.args["index"]) for s in ars])
    assert all(o == orders[0] for o in orders[1:])


def test_scheduler_cpu_overhead_with_gloo(interleaved):
    results, _ = interleaved
    for r, res in enumerate(results):
        print(
            f"rank {r}: scheduler own CPU {res['own_cpu_per_op_s'] * 1e6:.1f} us per micro-op over {res['done']} ops "
            f"(thread {res['thread_cpu_s'] * 1e3:.1f} ms incl. launches {res['launch_cpu_s'] * 1e3:.1f} ms; "
            f"callbacks {res['callback_cpu_s'] * 1e3:.1f} ms)"
        )
        assert 0 < res["own_cpu_per_op_s"] < 1e-3


@pytest.mark.parametrize("stall", [False, True], ids=["peer-exits", "peer-stalls"])
def test_flush_raises_when_peer_stops(tmp_path, stall):
    t0 = time.perf_counter()
    codes = _run_ranks(_peer_dies_worker, 2, tmp_path, stall, timeout_s=40.0)
    assert codes[0] == 0, f"rank 0 exited {codes[0]} (None = hung)"
    res = json.loads((tmp_path / "rank0.json").read_text())
    assert res["first_ok"]
    if stall:
        assert res["outcome"] == "timeout" and 1.4 <= res["elapsed_s"] < 5.0
    else:
        assert res["outcome"].startswith("error") and res["elapsed_s"] < 10.0
    print(
        f"peer {'stalls' if stall else 'exits'}: flush -> {res['outcome'][:90]} after {res['elapsed_s']:.2f} s "
        f"(job {time.perf_counter() - t0:.1f} s)"
    )

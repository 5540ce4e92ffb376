"""Start-up check of a time dilation: does the emulated link, not this machine's CPU, set the pace?

Under time dilation K every emulated rate is the real one / K. A K too small asks this machine
for more than its cores can move, and an all-to-all then runs at the CPU's speed: the fraction of
the link rate it reaches falls as K falls. The check measures an all-to-all alone (``4 MiB`` per
rank by default, Gloo over the emulated links, one process per worker in each host's namespace)
at K and at 2K; K passes when the fraction reached at K is at most 5% below the one at 2K. A K
that fails is refused with the smallest passing one, found by doubling.

The fraction at the chosen K is the links' efficiency for an all-to-all (shaping, TCP, Gloo's
pairwise exchange): reported in run summaries, and what the simulator's ``link_efficiency``
reproduces.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

from lina.cluster.spec import EmulateSpec, format_rate, parse_emulate
from lina.cluster.teardown import leave_distributed
from lina.errors import ConfigError, LinaError

BYTES_PER_RANK = 4 << 20
TOLERANCE = 0.05  # the fraction at K may be at most this much (relative) below the one at 2K
MAX_IDEAL_S = 2.0  # the search stops before one all-to-all would take longer than this at the link rate
_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class A2AMeasurement:
    """One all-to-all alone on the emulated cluster at dilation ``dilation``.

    Args:
        dilation: K.
        emulated_link_bps: the host link's emulated rate (real / K).
        seconds: median wall time of the all-to-all (slowest rank), emulated clock.
        ideal_s: what the busiest link needs for its bytes at its rate.
        fraction: ``ideal_s / seconds``: the share of the link rate the all-to-all reached.
    """

    dilation: float
    emulated_link_bps: int
    seconds: float
    ideal_s: float
    fraction: float


@dataclass(frozen=True)
class DilationCheck:
    """The outcome: the chosen K, every measurement, and the smallest K that passed (None: none
    up to the search's limit)."""

    dilation: float
    measurements: tuple[A2AMeasurement, ...]
    smallest_passing: float | None
    bytes_per_rank: int

    def at(self, dilation: float) -> A2AMeasurement:
        return next(m for m in self.measurements if m.dilation == dilation)

    @property
    def passes(self) -> bool:
        return self.smallest_passing == self.dilation

    @property
    def link_efficiency(self) -> float:
        """Fraction of the link rate an all-to-all alone reaches at the chosen K."""
        return self.at(self.dilation).fraction

    def to_dict(self) -> dict:
        return {
            "dilation": self.dilation,
            "passes": self.passes,
            "smallest_passing": self.smallest_passing,
            "link_efficiency": self.link_efficiency,
            "bytes_per_rank": self.bytes_per_rank,
            "tolerance": TOLERANCE,
            "measurements": [asdict(m) for m in self.measurements],
        }

    def summary_line(self) -> str:
        m, double = self.at(self.dilation), self.at(2 * self.dilation)
        return (
            f"all-to-all alone ({self.bytes_per_rank / 2**20:g} MiB per rank) reached {m.fraction:.0%} of the link rate "
            f"at dilation {self.dilation:g} (emulated {format_rate(m.emulated_link_bps)}) and {double.fraction:.0%} at "
            f"{2 * self.dilation:g}"
        )

    def raise_if_refused(self, skip_option: str = "--skip-dilation-check") -> None:
        """ConfigError naming the smallest passing dilation when the chosen one failed."""
        if self.passes:
            return
        m, double = self.at(self.dilation), self.at(2 * self.dilation)
        problem = (
            f"at {self.dilation:g} this machine's CPU, not the emulated link, sets an all-to-all's speed: it reaches "
            f"{m.fraction:.0%} of the link rate, against {double.fraction:.0%} at {2 * self.dilation:g} (more than "
            f"{TOLERANCE:.0%} lower)"
        )
        if self.smallest_passing is None:
            largest = max(x.dilation for x in self.measurements)
            fix = f"no dilation up to {largest:g} passed here; use a slower link, or {skip_option} to run anyway"
        else:
            fix = f"use --dilation {self.smallest_passing:g} (the smallest that passes), or {skip_option} to run anyway"
        raise ConfigError("dilation", problem, fix)


def ideal_a2a_s(spec: EmulateSpec, bytes_per_rank: int) -> float:
    """Seconds the busiest link of ``spec`` needs for one uniform all-to-all of ``bytes_per_rank``
    per rank: a host's link carries ``wph * bytes * (world - wph) / world`` each way, its
    intra-host link (when shaped) ``wph * bytes * (wph - 1) / world``."""
    wph, world = spec.workers_per_host, spec.world_size
    seconds = wph * bytes_per_rank * (world - wph) / world * 8 / spec.link_bps
    if spec.intra_bps:
        seconds = max(seconds, wph * bytes_per_rank * (wph - 1) / world * 8 / spec.intra_bps)
    return seconds


def search(
    dilation: float,
    measure: Callable[[float], A2AMeasurement],
    max_ideal_s: Callable[[float], float],
    bytes_per_rank: int = BYTES_PER_RANK,
) -> DilationCheck:
    """Measure at K and 2K; while K fails, double it (until one all-to-all at 2K would need more
    than :data:`MAX_IDEAL_S`). ``measure(K)`` runs one measurement; ``max_ideal_s(K)`` is the
    link-rate time of one all-to-all at K."""
    found: dict[float, A2AMeasurement] = {}

    def at(k: float) -> A2AMeasurement:
        if k not in found:
            found[k] = measure(k)
        return found[k]

    k, passing = dilation, None
    while True:
        if at(k).fraction >= (1 - TOLERANCE) * at(2 * k).fraction:
            passing = k
            break
        if max_ideal_s(4 * k) > MAX_IDEAL_S:
            break
        k *= 2
    return DilationCheck(dilation, tuple(found[d] for d in sorted(found)), passing, bytes_per_rank)


def check_dilation(
    emulate: str, dilation: float, *, bytes_per_rank: int = BYTES_PER_RANK, repeats: int = 5
) -> DilationCheck:
    """Run the check for the cluster ``emulate`` (``--emulate`` text, real-cluster units) at ``dilation``.

    Each measurement builds the cluster at that dilation, starts one process per worker inside
    its host's namespace, and times ``repeats`` all-to-alls after one warm-up (the median of the
    slowest rank's times).
    """

    def measure(k: float) -> A2AMeasurement:
        spec = parse_emulate(emulate, k)
        seconds = measure_a2a_s(spec, bytes_per_rank, repeats)
        ideal = ideal_a2a_s(spec, bytes_per_rank)
        return A2AMeasurement(k, spec.link_bps, seconds, ideal, ideal / seconds)

    def ideal_at(k: float) -> float:
        try:
            return ideal_a2a_s(parse_emulate(emulate, k), bytes_per_rank)
        except ConfigError:  # below the slowest rate tc shapes
            return float("inf")

    return search(dilation, measure, ideal_at, bytes_per_rank)


def measure_a2a_s(spec: EmulateSpec, bytes_per_rank: int, repeats: int, timeout_s: float = 120.0) -> float:
    """Median seconds of one all-to-all (slowest rank) on a fresh emulated cluster ``spec``."""
    import torch.distributed  # noqa: F401  (imported once here: forked ranks start without importing it)

    from lina.cluster.lifecycle import EmulatedCluster

    ctx = multiprocessing.get_context("fork")  # the check stays seconds
    with EmulatedCluster(spec, handle_signals=False) as cluster, tempfile.TemporaryDirectory() as tmp:
        # a file store: the TCP store would look up each peer's name, which a bare namespace cannot resolve
        store = f"file://{tmp}/store"
        results = ctx.Queue()
        procs = []
        for rank in range(spec.world_size):
            host = cluster.hosts[rank // spec.workers_per_host]
            args = (host.netns, host.ifname, store, rank, spec.world_size)
            procs.append(ctx.Process(target=_rank_main, args=(*args, bytes_per_rank, repeats, results), daemon=True))
        for proc in procs:
            proc.start()
        try:
            outcome = _collect(results, procs, timeout_s)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join(timeout=5)
    return outcome


def _collect(results, procs, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            kind, value = results.get(timeout=0.2)
        except Exception:  # queue.Empty: check that every rank still runs
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise LinaError(
                    f"the dilation check's all-to-all failed: rank {procs.index(dead[0])} exited with "
                    f"{dead[0].exitcode}; skip the check with --skip-dilation-check to run without it"
                ) from None
            continue
        if kind == "error":
            raise LinaError(f"the dilation check's all-to-all failed: {value}")
        return value
    raise LinaError(
        f"the dilation check's all-to-all did not finish in {timeout_s:g} s; skip it with --skip-dilation-check"
    )


def _rank_main(netns: str, ifname: str, store: str, rank: int, world: int, nbytes: int, repeats: int, out):
    """One rank of the check, inside host namespace ``netns``: warm-up, then ``repeats`` timed
    all-to-alls of ``nbytes`` (a uint8 tensor, split evenly); rank 0 puts the median of the
    slowest rank's times on ``out``."""
    try:
        _enter_netns(netns)
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=store,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        per_peer = nbytes // world
        send = torch.zeros(per_peer * world, dtype=torch.uint8)
        recv = torch.empty_like(send)
        times = []
        for i in range(repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(recv, send)
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i:  # the first one is a warm-up (connections, buffers)
                times.append(float(elapsed))
        if rank == 0:
            out.put(("ok", statistics.median(times)))
        leave_distributed()
    except Exception as err:  # reported to the parent, which names it
        out.put(("error", f"rank {rank}: {type(err).__name__}: {err}"))
        raise


def _enter_netns(name: str) -> None:
    """Move this process into network namespace ``name`` (``/run/netns/<name>``)."""
    from lina.cluster.processes import NETNS_DIR

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def startup_check(emulate: str, dilation: float, command: str, chosen_for_the_user: bool = False) -> DilationCheck:
    """The check as a command runs it before a device-time run, printing what it found.

    A dilation the command chose itself (``--cluster``'s) is raised to the smallest passing one,
    said so; a dilation the user gave that fails is refused (:class:`ConfigError` naming the
    smallest that passes). The returned check's ``dilation`` is the one to run at.
    """
    print(f"{command}: checking dilation {dilation:g} (an all-to-all alone at K and 2K)...", flush=True)
    check = check_dilation(emulate, dilation)
    print(f"{command}: {check.summary_line()}", flush=True)
    if not check.passes and chosen_for_the_user and check.smallest_passing is not None:
        print(
            f"{command}: dilation {dilation:g} is too small for this machine; running at {check.smallest_passing:g}, "
            "the smallest that passes",
            flush=True,
        )
        return replace(check, dilation=check.smallest_passing)
    check.raise_if_refused()
    return check

"""Fit the simulator to measured runs, then predict those runs.

A *run directory* holds ``summary.json`` and ``timeline-rank{R}.jsonl`` (spans written by
:meth:`lina.obs.timeline.Timeline.save_jsonl`). ``summary.json`` has ``step_time_s_median`` and
a ``config`` in either of two forms:

- flat: ``layers, d_model, d_ff, experts, top_k, seq_len, batch_size, workers, hosts,
  workers_per_host, link_bps, policy, chunk_mb`` (optional: ``bucket_mb``, ``pipeline_chunks``,
  ``ep_size``, ``vocab``, ``capacity_factor``);
- the project trainer's ``TrainConfig.to_dict()``: ``model.{n_layers, d_model, d_ff, experts,
  top_k, seq_len, vocab_size}``, ``workers, batch_size, schedule, chunk_mb, bucket_mb,
  pipeline_chunks`` and ``emulate`` (``"hosts=4,link=200mbit,workers_per_host=1"``); the
  expert-parallel group in effect is read from ``summary["packing"]["ep_size"]`` when present.

What the timelines must contain, per rank: ``step`` spans (cat ``step``); ``forward`` and
``backward`` compute spans around each pass; expert FFN compute spans (name containing
``expert``; backward ones containing ``bwd``); a2a spans with args ``bytes`` (what the rank
sends to the other ranks) and a direction (``phase`` or ``direction`` = ``fwd``/``bwd``);
allreduce spans with ``bytes``. Ranks' span times must share one clock (the host's monotonic
clock does): collectives are timed across ranks. ``config.cpu_count`` (optional) is the cores
the run's ranks shared.

Fitted (pooled over all runs, so a prediction is not its own measurement played back):

- compute, per token on one whole core: non-expert forward/backward (the passes minus their
  all-to-alls minus expert FFN; embedding and head included), expert FFN forward/backward (per
  routed token; backward from ``bwd`` expert spans, else the backward/forward ratio of the
  passes), and the optimizer per local parameter (step end after backward and every allreduce);
  how compute time grows as ranks share cores (:func:`fit_core_exponent`, apart for steps with
  no all-to-all); a fixed cost per layer when the runs have more than one token count
  (:func:`fit_per_layer`); how much later than the mean the last rank reaches an all-to-all
  (straggling);
- contention: the share of compute speed lost while an all-to-all, or an allreduce, is in flight
  (:func:`fit_slowdowns`; on the emulated cluster the collectives' threads share the compute's
  CPU cores), from how much longer the same shape computes under policies that overlap more;
  the per-token costs above are then those at full speed;
- network (:mod:`lina.sim.fit_links`): uncontended allreduces give the links' efficiency, the
  allreduce's launch and per-ring-step latency, and how much slower its bytes move while its
  ranks compute, per other rank on their core (the other way round from the contention above); uncontended forward all-to-alls crossing a
  host link, timed from the last rank's arrival to the last exit, give the all-to-all latency
  and three properties of the emulated cluster: what a rank sends per second per core it has
  (Gloo moves the bytes through TCP on shared cores), what one flow to another host moves, and
  how much of the link's goodput the flows of one all-to-all between the same two hosts lose per
  extra flow; uncontended all-to-alls that stay inside hosts give the loopback rate per core
  (with it, the per-core limit counts bytes to other hosts only). The runs' backend serves a
  rank's asynchronous all-to-alls ``GLOO_THREADS`` at a time, the earlier one first
  (``a2a_in_flight`` in the run's config overrides it).

Read from each run, not fitted (an input like a routing trace): how uneven its all-to-alls were
(:func:`lina.sim.a2a_skew.a2a_skew`: the busiest rank's bytes, sent or received, over the mean
rank's; the busiest host's when the group's ranks share host links). An all-to-all ends when its
busiest rank is done, so the link fit times the busiest's bytes and the prediction simulates
them (``TrainSpec.a2a_skew``); with dropless routing on 4 hosts of one rank, 16 experts give
1.5-1.6, 4 experts 1.3.

Predicting (:func:`predict`) also keeps a step's compute and loopback copies within the cores
its machine has (:func:`within_cores`).

:func:`write_synthetic_run` writes a run directory from the simulator itself (known
parameters), which the tests use to check that the fit recovers them.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from lina.errors import ConfigError, LinaError
from lina.obs.timeline import Span, Timeline, intersection_length, load_rank_timelines, union_length
from lina.sim.a2a_skew import a2a_skew
from lina.sim.compute import ComputeProfile
from lina.sim.fit_links import fit_allreduce, fit_a2a, fit_loopback
from lina.sim.repeats import pooled_rows, step_times
from lina.sim.spec import ClusterSpec, ModelSpec, TrainSpec
from lina.sim.train import TrainResult, simulate_step
from lina.sim.train_step import StepPlan

INTRA_FACTOR = 10.0  # intra-host link rate / host link rate when no loopback all-to-all was measured: above what the rank copy limit lets a rank send
GLOO_THREADS = 2  # threads of a Gloo process group: asynchronous operations of one rank run two at a time


# --------------------------------------------------------------------------- reading runs
@dataclass
class RunRecord:
    """One measured run: its shape, policy, measured median step and spans by rank."""

    path: Path
    hosts: int
    workers_per_host: int
    link_bps: float
    model: ModelSpec
    policy: str
    ep_size: int | None
    train: TrainSpec
    measured_step_s: float
    spans: dict[int, list[Span]] = field(repr=False, default_factory=dict)
    cpu_count: int | None = None  # cores of the machine the run shared (None: this machine's)
    a2a_in_flight: int = GLOO_THREADS  # all-to-all operations a rank's backend runs at once

    @property
    def a2a_skew(self) -> float:
        """The busiest rank's (or host's) all-to-all bytes over the mean rank's, read from the spans."""
        return self.train.a2a_skew

    @property
    def core_share(self) -> float:
        """Cores per rank, at most 1: the ranks of an emulated cluster share one machine's cores."""
        cores = self.cpu_count or os.cpu_count() or 1
        return min(1.0, cores / self.workers)

    @property
    def workers(self) -> int:
        return self.hosts * self.workers_per_host

    @property
    def label(self) -> str:
        m = self.model
        return (
            f"{self.path.name}: {self.hosts}x{self.workers_per_host} @{self.link_bps / 1e6:g}Mb/s "
            f"{m.layers}L d{m.d_model} E{m.experts} T{m.tokens}"
        )


def _get(cfg: dict, *names, default=None):
    for name in names:
        if name in cfg and cfg[name] is not None:
            return cfg[name]
    return default


def _config_fields(summary: dict, path: Path) -> dict:
    cfg = summary.get("config")
    if not isinstance(cfg, dict):
        raise LinaError(f"{path}/summary.json has no 'config' object")
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else cfg
    out = {
        "layers": _get(model, "layers", "n_layers"),
        "d_model": _get(model, "d_model"),
        "d_ff": _get(model, "d_ff"),
        "experts": _get(model, "experts"),
        "top_k": _get(model, "top_k"),
        "seq_len": _get(model, "seq_len"),
        "vocab": _get(model, "vocab", "vocab_size", default=256),
        "moe_every": _get(model, "moe_every", "moe_interval", default=1),
        "batch_size": _get(cfg, "batch_size"),
        "workers": _get(cfg, "workers"),
        "policy": _get(cfg, "policy", "schedule"),
        "chunk_mb": _get(cfg, "chunk_mb", default=30.0),
        "bucket_mb": _get(cfg, "bucket_mb", default=25.0),
        "coalesce_small": bool(_get(cfg, "coalesce_small", default=True)),
        "pipeline_chunks": _get(cfg, "pipeline_chunks", "tutel_chunks", default=2),
        "ep_size": _get(cfg, "ep_size", default=None) or None,
        "experts_per_rank": _get(cfg, "experts_per_rank", default=None),
        "hosts": _get(cfg, "hosts"),
        "workers_per_host": _get(cfg, "workers_per_host"),
        "link_bps": _get(cfg, "link_bps", "link_rate_bps", "link_bit_s"),
        "cpu_count": _get(cfg, "cpu_count", default=None),
        "a2a_in_flight": _get(cfg, "a2a_in_flight", default=None),
    }
    emulate = cfg.get("emulate")
    if isinstance(emulate, str) and out["hosts"] is None:
        from lina.cluster.emulate import parse_emulate

        spec = parse_emulate(emulate)
        if spec is None:
            raise LinaError(f"{path}: ran on plain loopback (emulate={emulate!r}); there is no link to calibrate")
        out.update(hosts=spec.hosts, workers_per_host=spec.workers_per_host, link_bps=spec.link_bps)
    if out["a2a_in_flight"] is None:  # NCCL runs a rank's collectives on one stream; Gloo on its threads
        backend = _get(cfg, "backend", default=summary.get("backend", "gloo"))
        out["a2a_in_flight"] = 1 if backend == "nccl" else GLOO_THREADS
    packing = summary.get("packing")
    if isinstance(packing, dict) and packing.get("ep_size"):
        out["ep_size"] = packing["ep_size"]
    elif out["experts_per_rank"]:
        out["ep_size"] = int(out["experts"]) // int(out["experts_per_rank"])
    missing = [k for k, v in out.items() if v is None and k not in ("ep_size", "experts_per_rank", "cpu_count", "a2a_in_flight")]
    if missing:
        raise LinaError(f"{path}/summary.json: config lacks {', '.join(missing)}")
    return out


def read_run(path: str | Path) -> RunRecord:
    """Read one run directory (see the module docstring)."""
    path = Path(path)
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError) as err:
        raise LinaError(f"cannot read {path}/summary.json: {err}") from err
    cfg = _config_fields(summary, path)
    measured = summary.get("step_time_s_median")
    if not isinstance(measured, (int, float)) or measured <= 0:
        raise LinaError(f"{path}/summary.json: step_time_s_median is missing or not positive")
    chunk = summary.get("chunk_mb_resolved", cfg["chunk_mb"])  # what "auto" chose, when the run says
    try:
        chunk = float(chunk)
    except (TypeError, ValueError):
        raise LinaError(f"{path}/summary.json: chunk_mb is {cfg['chunk_mb']!r} and the run does not say what it chose "
                        "(no chunk_mb_resolved): re-run with a fixed --chunk-mb, or with this version of lina train") from None
    model = ModelSpec(
        name=path.name,
        layers=int(cfg["layers"]),
        d_model=int(cfg["d_model"]),
        d_ff=int(cfg["d_ff"]),
        experts=int(cfg["experts"]),
        top_k=int(cfg["top_k"]),
        seq_len=int(cfg["seq_len"]),
        batch_size=int(cfg["batch_size"]),
        vocab=int(cfg["vocab"]),
        moe_every=int(cfg["moe_every"]),
        act_bytes=4,
        grad_bytes=4,
        param_bytes=4,
    )
    chunks = int(cfg["pipeline_chunks"])
    spans = load_rank_timelines(path)
    if not spans:
        raise LinaError(f"{path}: no timeline-rank*.jsonl files")
    counts = any(s.cat == "a2a" and s.name.split(".")[-1] == "counts" for s in spans[min(spans)])
    train = TrainSpec(chunk_mb=chunk, bucket_mb=float(cfg["bucket_mb"]), tutel_chunks=chunks, lina_a2a_chunks=chunks, count_exchange=counts,
                      coalesce_small=cfg["coalesce_small"])
    hosts, wph = int(cfg["hosts"]), int(cfg["workers_per_host"])
    if hosts * wph != int(cfg["workers"]):
        raise LinaError(f"{path}: {hosts} hosts x {wph} workers != {cfg['workers']} workers")
    run = RunRecord(path, hosts, wph, float(cfg["link_bps"]), model, str(cfg["policy"]),
                    int(cfg["ep_size"]) if cfg["ep_size"] else None, train, float(measured), spans,
                    int(cfg["cpu_count"]) if cfg["cpu_count"] else None, int(cfg["a2a_in_flight"]))
    # the busiest host's bytes when the group's all-to-alls share host links, else the busiest rank's
    g = _group_ranks_per_host(run)
    skew = a2a_skew(spans, g if _ep(run) > g else 1)
    return replace(run, train=replace(train, a2a_skew=skew))


def find_runs(root: str | Path) -> list[RunRecord]:
    """Every run directory at or below ``root`` (a folder holding ``summary.json``)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError("--calibrate", f"{root} is not a directory", "give the folder of emulated-cluster runs")
    dirs = sorted({p.parent for p in root.rglob("summary.json")})
    if not dirs:
        raise LinaError(f"no summary.json under {root}: nothing to calibrate against")
    return [read_run(d) for d in dirs]


# --------------------------------------------------------------------------- observations
def _direction(span: Span) -> str | None:
    for key in ("direction", "phase", "pass"):
        value = span.args.get(key)
        if value in ("fwd", "bwd"):
            return value
    name = span.name.lower()
    if "bwd" in name or "backward" in name:
        return "bwd"
    if "fwd" in name or "forward" in name:
        return "fwd"
    return None


def _instances(by_step: dict[int, list[list[Span]]], contended: set[int],
               busy_by_step: dict[int, list[list[tuple[float, float]]]] | None = None) -> list[tuple[float, float, float]]:
    """(bytes the mean rank sends, last exit - last arrival, share of that time the mean rank
    computes) of every uncontended collective that every rank ran (steps whose ranks ran
    different numbers of them are left out). ``busy_by_step``: per step, per rank, its compute
    intervals (none given: the share is 0)."""
    out = []
    for k, per_rank in by_step.items():
        if len({len(spans) for spans in per_rank}) != 1:
            continue
        busy = busy_by_step.get(k) if busy_by_step else None
        for same in zip(*per_rank):
            if any(id(s) in contended for s in same):
                continue
            start, end = max(s.start_s for s in same), max(s.end_s for s in same)
            if end <= start:
                continue
            share = 0.0
            if busy and len(busy) == len(same):
                share = sum(intersection_length([(start, end)], b) for b in busy) / len(busy) / (end - start)
            out.append((sum(float(s.args["bytes"]) for s in same) / len(same), end - start, share))
    return out


def _overlaps(span: Span, others: list[Span]) -> bool:
    return any(o is not span and o.start_s < span.end_s and span.start_s < o.end_s for o in others)


@dataclass
class StepObs:
    fwd_dense_s: float  # forward pass neither in an all-to-all nor in expert compute
    fwd_expert_s: float
    bwd_rest_s: float  # backward pass neither in an all-to-all nor in a *recorded* backward expert span
    bwd_expert_s: float | None  # None when backward expert compute has no spans of its own
    tail_s: float  # after backward and every allreduce: optimizer
    # compute time spent with a collective in flight (the contention the slowdowns are fitted to):
    a2a_overlap_fwd_s: float = 0.0  # expert compute during an all-to-all, forward
    a2a_overlap_bwd_s: float = 0.0
    allreduce_overlap_fwd_s: float = 0.0  # compute during an allreduce and no all-to-all
    allreduce_overlap_bwd_s: float = 0.0

    @property
    def compute_s(self) -> float:
        return self.fwd_dense_s + self.fwd_expert_s + self.bwd_rest_s + (self.bwd_expert_s or 0.0)

    @property
    def a2a_overlap_s(self) -> float:
        return self.a2a_overlap_fwd_s + self.a2a_overlap_bwd_s

    @property
    def allreduce_overlap_s(self) -> float:
        return self.allreduce_overlap_fwd_s + self.allreduce_overlap_bwd_s


def _clip(intervals: list[tuple[float, float]], window: Span) -> list[tuple[float, float]]:
    out = [(max(a, window.start_s), min(b, window.end_s)) for a, b in intervals]
    return [(a, b) for a, b in out if b > a]


def _overlaps_in_pass(pass_span: Span, a2a: list[tuple[float, float]], allreduce: list[tuple[float, float]],
                      experts: list[tuple[float, float]]) -> tuple[float, float]:
    """(expert compute during an all-to-all, compute during an allreduce but no all-to-all) in a pass.

    Compute is taken to run whenever the pass is neither waiting on an all-to-all nor idle, and in
    every expert span (which may overlap a pipelined all-to-all).
    """
    a2a, ar = _clip(a2a, pass_span), _clip(allreduce, pass_span)
    in_a2a = intersection_length(_clip(experts, pass_span), a2a)
    in_ar = union_length(ar) - intersection_length(ar, a2a)
    return in_a2a, in_ar


@dataclass
class RunObs:
    steps: list[StepObs]
    a2a: list[tuple[float, float]]  # (bytes the mean rank sends, seconds across ranks), forward, uncontended
    allreduce: list[tuple[float, float, float]]  # (bytes, seconds across ranks, share of it the ranks compute), not beside an a2a
    sync_wait_s: float = 0.0  # per step: the last rank's arrivals at all-to-alls beyond the mean rank's compute before them

    @property
    def compute_s(self) -> float:
        """Median compute per step of a rank."""
        return _median([s.compute_s for s in self.steps])


def observe(run: RunRecord, skip_first: bool = True) -> RunObs:
    """Per-step compute totals of every rank, and uncontended collective durations.

    A collective is timed across ranks (their clocks are the host's monotonic clock): from the
    last rank's arrival to the last rank's exit, so a rank that waits in it for a slower peer does
    not count as network time; its bytes are what the mean rank sends. One instance is the j-th
    forward all-to-all (or allreduce) of a step on every rank; it is uncontended when no rank
    runs another collective beside it.
    """
    steps = []
    a2a_by_step: dict[int, list[list[Span]]] = {}  # step index -> per rank, its forward a2a spans in order
    all_a2a_by_step: dict[int, list[list[Span]]] = {}  # the same, every all-to-all
    ar_by_step: dict[int, list[list[Span]]] = {}
    busy_by_step: dict[int, list[list[tuple[float, float]]]] = {}  # step -> per rank, its forward and backward passes
    contended: set[int] = set()  # id() of spans that overlap another collective on their rank
    for spans in run.spans.values():
        windows = sorted((s for s in spans if s.cat == "step"), key=lambda s: s.start_s)
        if skip_first and len(windows) >= 3:
            windows = windows[1:]
        for k, w in enumerate(windows):
            inside = [s for s in spans if s.cat != "step" and s.start_s >= w.start_s - 1e-9 and s.end_s <= w.end_s + 1e-9]
            a2as = sorted((s for s in inside if s.cat == "a2a"), key=lambda s: s.start_s)
            ars = sorted((s for s in inside if s.cat == "allreduce"), key=lambda s: s.start_s)
            for s in a2as:
                if _overlaps(s, a2as):
                    contended.add(id(s))
            for s in ars:
                if _overlaps(s, a2as) or _overlaps(s, ars):
                    contended.add(id(s))
            a2a_by_step.setdefault(k, []).append([s for s in a2as if _direction(s) == "fwd" and "bytes" in s.args])
            all_a2a_by_step.setdefault(k, []).append(a2as)
            ar_by_step.setdefault(k, []).append([s for s in ars if "bytes" in s.args])
            busy_by_step.setdefault(k, []).append([(s.start_s, s.end_s) for s in inside if s.cat == "compute" and s.name in ("forward", "backward")])
            fwd = next((s for s in inside if s.cat == "compute" and s.name == "forward"), None)
            bwd = next((s for s in inside if s.cat == "compute" and s.name == "backward"), None)
            if fwd is None or bwd is None:
                continue

            experts = [s for s in inside if s.cat == "compute" and "expert" in s.name.lower()]
            e_fwd = [s for s in experts if _direction(s) != "bwd"]
            e_bwd = [s for s in experts if _direction(s) == "bwd"]

            def rest(pass_span: Span, busy: list[Span]) -> float:
                cut = [(max(s.start_s, pass_span.start_s), min(s.end_s, pass_span.end_s)) for s in a2as + busy]
                return pass_span.dur_s - union_length([(a, b) for a, b in cut if b > a])

            done = max([bwd.end_s] + [s.end_s for s in ars])
            a2a_iv = [(s.start_s, s.end_s) for s in a2as]
            ar_iv = [(s.start_s, s.end_s) for s in ars]
            ov_fwd = _overlaps_in_pass(fwd, a2a_iv, ar_iv, [(s.start_s, s.end_s) for s in e_fwd])
            ov_bwd = _overlaps_in_pass(bwd, a2a_iv, ar_iv, [(s.start_s, s.end_s) for s in e_bwd])
            steps.append(StepObs(
                fwd_dense_s=rest(fwd, e_fwd),
                fwd_expert_s=sum(s.dur_s for s in e_fwd),
                bwd_rest_s=rest(bwd, e_bwd),
                bwd_expert_s=sum(s.dur_s for s in e_bwd) if e_bwd else None,
                tail_s=w.end_s - done,
                a2a_overlap_fwd_s=ov_fwd[0],
                a2a_overlap_bwd_s=ov_bwd[0],
                allreduce_overlap_fwd_s=ov_fwd[1],
                allreduce_overlap_bwd_s=ov_bwd[1],
            ))
    a2a = [(b, d) for b, d, _ in _instances(a2a_by_step, contended)]
    allreduce = _instances(ar_by_step, contended, busy_by_step)
    waits = []
    for per_rank in all_a2a_by_step.values():
        if len(per_rank) < 2 or len({len(spans) for spans in per_rank}) != 1:
            continue
        instances = list(zip(*per_rank))
        late = 0.0
        for done, nxt in zip(instances, instances[1:]):
            if any(id(x) in contended for x in done + nxt):
                continue
            # after the last rank leaves one all-to-all, the next starts when the last rank arrives:
            # what that takes beyond the mean rank's compute in between is straggling
            mean_gap = sum(b.start_s - a.end_s for a, b in zip(done, nxt)) / len(done)
            late += max(b.start_s for b in nxt) - max(a.end_s for a in done) - mean_gap
        waits.append(late)
    if not steps:
        raise LinaError(f"{run.path}: no step with 'forward' and 'backward' compute spans")
    return RunObs(steps, a2a, allreduce, _median(waits))


# --------------------------------------------------------------------------- fitting
@dataclass
class CalibrationFit:
    profile: ComputeProfile
    link_efficiency: float
    a2a_latency_s: float
    allreduce_launch_s: float
    allreduce_hop_s: float
    intra_factor: float
    a2a_samples: int
    allreduce_samples: int
    note: str = ""
    core_copy_bytes_per_s: float | None = None  # all-to-all bytes a rank sends per second per whole core (None: no limit)
    flow_copy_bytes_per_s: float | None = None  # bytes per second of one all-to-all flow to another host (None: no limit)
    core_exponent: float = 1.0  # compute time ~ (cores per rank) ** -core_exponent
    core_exponent_no_a2a: float | None = None  # the same for steps without all-to-all (None: core_exponent)
    allreduce_slowdown_per_sharer: float = 0.0  # allreduce speed lost while computing, per other rank on the same core
    loopback_bytes_per_s: float | None = None  # all-to-all bytes to ranks of the same host per second per whole core (None: not fitted)
    pair_flow_loss: float = 0.0  # host-link goodput lost per extra flow of one all-to-all between two hosts
    loopback_samples: int = 0
    loopback_sampled_bytes_per_s: float | None = None  # what the uncontended loopback all-to-alls alone give (least squares)
    loopback_step_runs: int = 0  # runs whose step times the loopback rate was fitted to (0: the samples' rate kept)

    def profile_for(self, run: RunRecord) -> ComputeProfile:
        """The fitted profile on ``run``'s share of the cores (costs and allreduce slowdown)."""
        return self.profile_at(run, run.core_share ** self.exponent_for(run))

    def profile_at(self, run: RunRecord, speed: float) -> ComputeProfile:
        """The fitted profile computing at ``speed`` of a whole core, with ``run``'s collective slowdowns."""
        slow = min(0.9, self.allreduce_slowdown_per_sharer * _core_sharers(run))
        # loopback copies are CPU work like the allreduce's: they lose the same share beside compute
        loop = slow if self.loopback_bytes_per_s is not None else 0.0
        profile = replace(self.profile, allreduce_slowdown_in_compute=slow, loopback_slowdown_in_compute=loop)
        return on_core_share(profile, speed)

    def exponent_for(self, run: RunRecord) -> float:
        """The core-sharing exponent of ``run``'s kind (see :func:`fit_core_exponent`)."""
        return _exponent_of(run, self.core_exponent, self.core_exponent_no_a2a)

    def cluster_for(self, run: RunRecord) -> ClusterSpec:
        gbps = run.link_bps / 1e9
        core = self.core_copy_bytes_per_s
        return ClusterSpec(
            hosts=run.hosts,
            gpus_per_host=run.workers_per_host,
            link_gbps=gbps,
            nvlink_gbps=gbps * self.intra_factor if self.loopback_bytes_per_s is None else self.loopback_bytes_per_s * run.core_share * 8 / 1e9,
            link_efficiency=min(1.0, self.link_efficiency),
            launch_s=self.a2a_latency_s,
            per_peer_s=0.0,
            hop_latency_s=self.allreduce_hop_s,
            allreduce_launch_s=self.allreduce_launch_s,
            rank_copy_gbps=None if core is None else core * run.core_share * 8 / 1e9,
            flow_copy_gbps=None if self.flow_copy_bytes_per_s is None else self.flow_copy_bytes_per_s * 8 / 1e9,
            a2a_in_flight=run.a2a_in_flight,
            copy_intra=self.loopback_bytes_per_s is None,
            pair_flow_loss=self.pair_flow_loss,
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "profile": self.profile.to_dict()}


def _exponent_of(run: RunRecord, with_a2a: float, without: float | None) -> float:
    """The core-sharing exponent for ``run``: ``without`` when its step has no all-to-all."""
    return without if _ep(run) == 1 and without is not None else with_a2a


def _core_sharers(run: RunRecord) -> float:
    """Other ranks per core beside a rank of ``run`` (0 when each rank has a core or more)."""
    return max(0.0, 1.0 / run.core_share - 1.0)


def _ep(run: RunRecord) -> int:
    return run.ep_size or min(run.model.experts, run.workers)


def _group_ranks_per_host(run: RunRecord) -> int:
    """Ranks of one all-to-all group on each of its hosts."""
    return min(run.workers_per_host, _ep(run))


def _busiest_link_bytes(run: RunRecord, sent: float) -> float:
    """Bytes of one uniform all-to-all on the busiest host link, when each rank sends ``sent``
    bytes to the other ranks of its group (what the trainer's spans record)."""
    ep, g = _ep(run), _group_ranks_per_host(run)
    if ep <= g:
        return 0.0
    return g * sent * (ep - g) / (ep - 1)


def _median(xs):
    return statistics.median(xs) if xs else 0.0


def _shape_key(run: RunRecord) -> tuple:
    """Runs that differ only in policy share this key (and so the same compute work)."""
    m = run.model
    return (run.hosts, run.workers_per_host, run.link_bps, m.layers, m.d_model, m.d_ff, m.experts, m.top_k, m.tokens, _ep(run))


def fit_per_layer(layers: np.ndarray, tokens: np.ndarray, seconds: np.ndarray) -> tuple[float, float]:
    """(fixed seconds per layer, seconds per token and layer) of runs' non-expert pass times.

    ``seconds[i]`` is run ``i``'s pass over ``layers[i]`` layers of ``tokens[i]`` tokens each:
    least squares of ``seconds / layers = fixed + per_token * tokens`` when the runs have more
    than one token count (and the fixed cost comes out non-negative); otherwise no fixed cost
    and the pooled per-token cost.
    """
    per_layer = seconds / layers
    if len(np.unique(tokens)) > 1:
        (per_token, fixed), *_ = np.linalg.lstsq(np.stack([tokens, np.ones_like(tokens)], axis=1), per_layer, rcond=None)
        if fixed >= 0 and per_token >= 0:
            return float(fixed), float(per_token)
    return 0.0, max(0.0, float(seconds.sum() / (layers * tokens).sum()))


def fit_core_exponent(runs: list[RunRecord], obs: list[RunObs]) -> tuple[float, float | None]:
    """How compute time grows as ranks share cores: ``time ~ core_share ** -exponent``, for runs
    with all-to-alls and for runs without (pure data parallelism).

    1 would be a rank running at exactly its share of a core; less, when sharing costs less than
    that (idle moments of one rank are another's compute: all-to-alls pause the ranks in turn;
    with none, ranks sharing cores compute side by side the whole step). Fitted on compute per
    token and layer (log-log least squares, one intercept per token count, since runs with fewer
    tokens pay more per token, and one slope per kind of run) where runs of one token count and
    kind have more than one core share; otherwise 1 (with all-to-alls) or ``None`` (without:
    the exponent of runs with all-to-alls).
    """
    tokens = sorted({r.model.tokens for r in runs})

    def varied(kind: bool) -> bool:
        return any(len({r.core_share for r in runs if r.model.tokens == t and (_ep(r) > 1) == kind}) > 1 for t in tokens)

    kinds = [k for k in (True, False) if varied(k)]  # with all-to-alls, without
    if not kinds:
        return 1.0, None
    xs, ys = [], []
    for r, o in zip(runs, obs):
        kind = _ep(r) > 1
        if kind not in kinds:
            continue
        slopes = [math.log(r.core_share) if kind == k else 0.0 for k in kinds]
        xs.append(slopes + [1.0 if r.model.tokens == t else 0.0 for t in tokens])
        ys.append(math.log(o.compute_s / (r.model.layers * r.model.tokens)))
    coef, *_ = np.linalg.lstsq(np.asarray(xs), np.asarray(ys), rcond=None)
    value = {k: min(1.0, max(0.0, -float(c))) for k, c in zip(kinds, coef)}
    return value.get(True, 1.0), value.get(False)


def fit_slowdowns(runs: list[RunRecord], obs: list[RunObs]) -> tuple[float, float]:
    """Share of compute speed lost while an all-to-all / an allreduce is in flight.

    Each run's median compute per step is ``W + a * O_a2a + r * O_allreduce``: ``W`` the work of its
    shape (shared by the runs of one shape, which differ only in policy) and ``O`` the compute time
    spent with that collective in flight. Fitted by least squares within shapes that have at least
    two runs (a lone run cannot tell work from slowdown); each share is kept in [0, 0.9].
    """
    by_shape: dict[tuple, list[tuple[float, float, float]]] = {}
    for r, o in zip(runs, obs):
        row = (o.compute_s, _median([s.a2a_overlap_s for s in o.steps]),
               _median([s.allreduce_overlap_s for s in o.steps]))
        by_shape.setdefault(_shape_key(r), []).append(row)
    ys, xs = [], []
    for rows in by_shape.values():
        if len(rows) < 2:
            continue
        mean = np.mean(np.asarray(rows), axis=0)
        for row in rows:
            d = np.asarray(row) - mean
            ys.append(d[0])
            xs.append(d[1:])
    if len(ys) < 2:
        return 0.0, 0.0
    coef, *_ = np.linalg.lstsq(np.asarray(xs), np.asarray(ys), rcond=1e-9)
    a2a, allreduce = (float(v) for v in coef)
    if a2a < 0 or allreduce < 0:  # a negative share is noise: refit the other alone
        keep = 0 if a2a >= allreduce else 1
        x = np.asarray(xs)[:, keep]
        value = float(x @ np.asarray(ys) / (x @ x)) if x @ x > 0 else 0.0
        a2a, allreduce = (value, 0.0) if keep == 0 else (0.0, value)
    return min(max(a2a, 0.0), 0.9), min(max(allreduce, 0.0), 0.9)


def fit(runs: list[RunRecord]) -> CalibrationFit:
    """Fit compute and link parameters to ``runs`` (pooled; see the module docstring)."""
    obs = [observe(r) for r in runs]
    slow_a2a, slow_ar = fit_slowdowns(runs, obs)
    exponent, exponent_no_a2a = fit_core_exponent(runs, obs)

    def exponent_of(r: RunRecord) -> float:
        return _exponent_of(r, exponent, exponent_no_a2a)
    # ranks drift apart between all-to-alls; the step runs at the pace of the last to arrive
    computed = sum(o.compute_s for o in obs)
    straggler = min(1.0, sum(o.sync_wait_s for o in obs) / computed) if computed > 0 else 0.0
    dense_rows = []  # per run: (layers, tokens, forward and backward non-expert seconds at full speed on a whole core)
    slot_layers = e_fwd = e_bwd = 0.0
    params = tail = 0.0
    for r, o in zip(runs, obs):
        m = r.model
        # Work at full speed: take off what the collectives in flight cost (see fit_slowdowns).
        fd = _median([s.fwd_dense_s - slow_ar * s.allreduce_overlap_fwd_s for s in o.steps])
        ef = _median([s.fwd_expert_s - slow_a2a * s.a2a_overlap_fwd_s for s in o.steps])
        br = _median([s.bwd_rest_s - slow_ar * s.allreduce_overlap_bwd_s for s in o.steps])
        if all(s.bwd_expert_s is not None for s in o.steps):
            eb = _median([s.bwd_expert_s - slow_a2a * s.a2a_overlap_bwd_s for s in o.steps])
            bd = br
        else:  # backward expert compute hides in the pass: split it like the forward
            ratio = br / (fd + ef) if fd + ef > 0 else 2.0
            eb = ef * ratio
            bd = br - eb
        share = r.core_share ** exponent_of(r)  # costs are fitted per whole core (see fit_core_exponent)
        fd, ef, bd, eb = fd * share, ef * share, bd * share, eb * share
        dense_rows.append((m.layers, m.tokens, fd, bd))
        slot_layers += m.moe_layers * m.tokens * m.top_k * m.capacity_factor
        e_fwd += ef
        e_bwd += eb
        plan = StepPlan(ClusterSpec(r.hosts, r.workers_per_host, r.link_bps / 1e9), m, None, r.train, _ep(r))
        params += plan.local_params()
        tail += _median([s.tail_s for s in o.steps]) * r.core_share ** exponent_of(r)
    rows = np.asarray(dense_rows)
    layer_fwd, dense_fwd = fit_per_layer(rows[:, 0], rows[:, 1], rows[:, 2])
    layer_bwd, dense_bwd = fit_per_layer(rows[:, 0], rows[:, 1], rows[:, 3])
    profile = ComputeProfile(
        dense_fwd_s_per_token=dense_fwd,
        dense_bwd_s_per_token=dense_bwd,
        layer_fwd_s=layer_fwd,
        layer_bwd_s=layer_bwd,
        expert_fwd_s_per_token=max(0.0, e_fwd / slot_layers) if slot_layers else 0.0,
        expert_bwd_s_per_token=max(0.0, e_bwd / slot_layers) if slot_layers else 0.0,
        optimizer_s_per_param=max(0.0, tail / params) if params else 0.0,
        slowdown_in_a2a=slow_a2a,
        slowdown_in_allreduce=slow_ar,
        straggler=straggler,
    )
    # allreduce: duration = launch + ring steps x hop + busiest-link bytes / (efficiency x rate)
    # ... and, beside compute, its bytes move slower
    ar_samples, ar_weights = [], []  # per run, size and computed share (none, or in quarters): the median, weighted by how many ran
    for r, o in zip(runs, obs):
        line = r.link_bps / 8
        n = r.workers
        groups: dict[tuple[float, float], list[tuple[float, float]]] = {}
        for nbytes, dur, busy in o.allreduce:
            groups.setdefault((nbytes, round(busy * 4) / 4 if busy > 0 else -1.0), []).append((dur, busy))
        sharers = _core_sharers(r)
        for (nbytes, _), rows in groups.items():
            dur = _median([d for d, _ in rows])
            busy = dur * sum(b for _, b in rows) / len(rows)
            # computed seconds weighed by the other ranks on the core: the fitted slowdown is per such rank
            ar_samples.append((2 * (n - 1), 2 * (n - 1) / n * nbytes / line, dur, busy * sharers))
            ar_weights.append(len(rows))
    ar_slowdown = 0.0
    if ar_samples:
        ar_launch, ar_hop, efficiency, ar_slowdown = fit_allreduce(np.asarray(ar_samples), np.asarray(ar_weights))
    # all-to-all: duration = latency + max(link bytes / (efficiency x rate x pair loss), bytes / (core rate x cores),
    # flow / flow cap); all-to-alls that stay inside hosts: latency + bytes / (loopback rate x cores)
    samples = []  # (busiest-link line seconds, bytes one rank sends, to other hosts, its largest flow to another host,
    #              cores per rank, duration, flows between two hosts)
    loopback = []  # (bytes one rank sends, cores per rank, duration)
    small = []
    for r, o in zip(runs, obs):
        line = r.link_bps / 8
        ep, g = _ep(r), _group_ranks_per_host(r)
        for mean_bytes, dur in o.a2a:
            if mean_bytes < 1024:
                small.append(dur)
                continue
            nbytes = mean_bytes * r.a2a_skew  # the busiest rank's: it ends the all-to-all
            if _busiest_link_bytes(r, nbytes) > 0:
                samples.append((_busiest_link_bytes(r, nbytes) / line, nbytes, nbytes * (ep - g) / (ep - 1), nbytes / (ep - 1),
                                r.core_share, dur, g * g))
            else:
                loopback.append((nbytes, r.core_share, dur))
    if not samples:
        raise LinaError("no uncontended forward all-to-all crossed a host link: cannot fit the link")
    samples = np.asarray(samples)
    if not ar_samples:  # no allreduce to read the link from: the all-to-alls' own line bound, as if no other limit held
        efficiency = float(np.clip(np.median(samples[:, 0] / samples[:, 5]), 0.05, 1.0))
        ar_launch = ar_hop = None
    # with loopback all-to-alls to read their own rate from, the per-core rate counts bytes to other hosts only
    counted = samples[:, 2] if loopback else samples[:, 1]
    link_samples = np.column_stack([samples[:, 0], counted, samples[:, 3:]])
    latency, core_copy, flow_copy, pair_loss, note = fit_a2a(link_samples, small, efficiency)
    loopback_rate = fit_loopback(np.asarray(loopback), latency) if loopback else None
    if ar_launch is None:
        ar_launch, ar_hop = latency, 0.0
    fitted = CalibrationFit(profile, efficiency, latency, ar_launch, ar_hop, INTRA_FACTOR, len(samples), int(sum(ar_weights)), note,
                            core_copy, flow_copy, exponent, exponent_no_a2a, ar_slowdown, loopback_rate, pair_loss, len(loopback),
                            loopback_rate)
    return fit_loopback_to_steps(fitted, runs)


LOOPBACK_MULTIPLIERS = tuple(2.0 ** (k / 2) for k in range(-2, 7))  # around the samples' rate: 0.5x .. 8x


def fit_loopback_to_steps(fitted: CalibrationFit, runs: list[RunRecord]) -> CalibrationFit:
    """The loopback rate that best predicts the step times (least squares of relative errors) of
    the runs whose all-to-alls stay partly inside hosts, searched around the rate the uncontended
    loopback all-to-alls give alone.

    Those samples cannot pin the rate down on shared cores: 1 MB moves in about 1 ms when both
    ranks run and in 10-40 ms when one waits for a core (the waits are core sharing, which the
    compute model charges already), so their least-squares rate follows how many waits a run
    happened to catch (2.6 or 5.3 Gbit/s per core from two sets of the same configurations).
    Searched on a grid of factors of sqrt(2), then refined by a quarter step either side.
    ``fitted`` unchanged when there is no such run or no loopback rate.
    """
    base = fitted.loopback_bytes_per_s
    local = [r for r in runs if _ep(r) > 1 and _group_ranks_per_host(r) > 1]
    if base is None or not local:
        return fitted

    def cost(factor: float) -> float:
        trial = replace(fitted, loopback_bytes_per_s=base * factor)
        return sum(((predict(trial, r).step_s - r.measured_step_s) / r.measured_step_s) ** 2 for r in local)

    costs = {m: cost(m) for m in LOOPBACK_MULTIPLIERS}
    best = min(costs, key=costs.get)
    for m in (best * 2 ** -0.25, best * 2 ** 0.25):
        costs[m] = cost(m)
    best = min(costs, key=costs.get)
    return replace(fitted, loopback_bytes_per_s=base * best, loopback_step_runs=len(local))


# --------------------------------------------------------------------------- predicting
POLICY_OF_SCHEDULE = {"deepspeed": "deepspeed", "sequential": "sequential", "tutel": "tutel", "lina": "lina"}


def predict(fitted: CalibrationFit, run: RunRecord) -> TrainResult:
    """Simulate one step of ``run`` with the fitted parameters.

    Lina's allreduce micro-ops run one at a time, as the trainer runs them during backward. After
    backward the trainer lets four run at once, but over Gloo they move no more per second than
    one does (after backward, the 4x1 pure data-parallel run sent about 40 MB/s per rank with
    four in flight; one 286 KB allreduce at a time sends about 47 MB/s in the 4x1 sequential
    run), so running them one at a time is the closer model.

    The ranks share one machine's cores, so their compute cannot take more core-seconds than the
    machine has: see :func:`within_cores`.
    """
    policy = POLICY_OF_SCHEDULE.get(run.policy, run.policy)
    if policy == "lina+packing":  # the run records the packing its controller chose: simulate that layout
        policy = "lina"
    train = replace(run.train, ep_size=_ep(run))
    cluster = fitted.cluster_for(run)
    speed = run.core_share ** fitted.exponent_for(run)
    result = simulate_step(cluster, run.model, fitted.profile_at(run, speed), train, policy)
    for _ in range(CORE_ROUNDS):
        slower = within_cores(fitted, run, result, speed)
        if slower >= speed * (1 - 1e-3):
            break
        speed = slower
        result = simulate_step(cluster, run.model, fitted.profile_at(run, speed), train, policy)
    return result


CORE_ROUNDS = 8  # re-simulations that bring a step's compute within its machine's cores


def within_cores(fitted: CalibrationFit, run: RunRecord, result: TrainResult, speed: float) -> float:
    """The compute speed (share of a whole core) at which ``result``'s passes fit the cores.

    The fitted core-sharing exponent gives a rank more than its share of the cores while it
    computes (other ranks are paused in all-to-alls meanwhile), but all ranks together cannot
    use more than the machine has: over the forward and backward passes, a rank's work on a
    whole core plus the core-seconds of its loopback all-to-all copies must fit in the passes
    times its share of the cores. A loopback byte is copied twice, out of the sender and into
    the receiver, each at the fitted loopback rate (timed with both ends copying at once), and a
    rank of a uniform all-to-all receives as many loopback bytes as it sends.
    When it does not (ranks whose all-to-alls stay inside a host wait little and compute side
    by side), compute slows to the speed that makes it fit; otherwise ``speed`` is returned.
    ``speed`` is what ``result`` was simulated at.
    """
    passes = [t for t in result.tasks if t.cat == "compute" and t.args.get("direction") in ("fwd", "bwd")]
    if not passes or run.core_share >= 1.0:
        return speed
    elapsed = max(t.end_s for t in passes) - min(t.start_s for t in result.tasks)
    work = sum(t.duration_s for t in passes) * speed
    copies = 0.0
    ep, g = _ep(run), _group_ranks_per_host(run)
    if fitted.loopback_bytes_per_s and ep > 1 and g > 1:
        sent = sum(t.args.get("bytes", 0.0) for t in result.tasks if t.cat == "a2a" and t.args.get("bytes", 0.0) >= 1024)
        copies = 2 * sent * (g - 1) / (ep - 1) / fitted.loopback_bytes_per_s
    need = (work + copies) / run.core_share
    return speed if need <= elapsed else speed * elapsed / need


def on_core_share(profile: ComputeProfile, share: float) -> ComputeProfile:
    """``profile`` (costs on one whole core) for a rank that gets ``share`` of a core."""
    costs = ("dense_fwd_s_per_token", "dense_bwd_s_per_token", "expert_fwd_s_per_token", "expert_bwd_s_per_token", "expert_min_s",
             "head_fwd_s_per_token", "head_bwd_s_per_token", "optimizer_s_per_param")
    return replace(profile, **{name: getattr(profile, name) / share for name in costs})


@dataclass
class CalibrationReport:
    fit: CalibrationFit
    rows: list[dict]
    holdout_rows: list[dict] = field(default_factory=list)  # runs predicted but never fitted
    config_rows: list[dict] = field(default_factory=list)  # the fitted runs per configuration and policy (see lina.sim.repeats)

    @property
    def median_abs_error(self) -> float:
        return statistics.median(abs(r["error"]) for r in self.rows)

    @property
    def config_median_abs_error(self) -> float | None:
        return statistics.median(abs(r["error"]) for r in self.config_rows) if self.config_rows else None

    @property
    def holdout_median_abs_error(self) -> float | None:
        return statistics.median(abs(r["error"]) for r in self.holdout_rows) if self.holdout_rows else None

    def to_dict(self) -> dict:
        return {"fit": self.fit.to_dict(), "rows": self.rows, "median_abs_error": self.median_abs_error,
                "holdout_rows": self.holdout_rows, "holdout_median_abs_error": self.holdout_median_abs_error,
                "config_rows": self.config_rows, "config_median_abs_error": self.config_median_abs_error}


def _rows(fitted: CalibrationFit, runs: list[RunRecord]) -> list[dict]:
    rows = []
    for r in runs:
        pred = predict(fitted, r).step_s
        rows.append({"run": str(r.path), "config": r.label, "policy": r.policy, "measured_s": r.measured_step_s,
                     "predicted_s": pred, "error": (pred - r.measured_step_s) / r.measured_step_s, "a2a_skew": r.a2a_skew})
    return rows


def calibrate(root: str | Path | list, holdout: str | Path | None = None) -> CalibrationReport:
    """Fit to the runs under ``root`` (a folder or a list of folders) and predict them; with
    ``holdout``, predict its runs too (with the same fit: they test the model on runs it was
    not fitted to)."""
    roots = root if isinstance(root, (list, tuple)) else [root]
    runs = [r for folder in roots for r in find_runs(folder)]
    held = find_runs(holdout) if holdout is not None else []
    fitted = fit(runs)
    rows = _rows(fitted, runs)
    return CalibrationReport(fitted, rows, _rows(fitted, held), pooled_rows(rows, [step_times(r.spans) for r in runs]))


def _rate(bytes_per_s: float | None, per: str) -> str:
    if bytes_per_s is None:
        return "without a limit of its own"
    return f"at most {bytes_per_s * 8 / 1e6:.0f} Mbit/s" + (f" {per}" if per else "")


def report_text(rep: CalibrationReport) -> str:
    f = rep.fit
    p = f.profile
    lines = [
        "fitted parameters:",
        f"  links carry {f.link_efficiency:.3f} of their configured rate; an allreduce costs {f.allreduce_launch_s * 1e3:.3f} ms "
        f"+ {f.allreduce_hop_s * 1e3:.3f} ms per ring step ({f.allreduce_samples} uncontended allreduces); "
        f"an allreduce loses {f.allreduce_slowdown_per_sharer:.0%} of its speed while its ranks compute, per other rank on their core",
        f"  all-to-all: latency {f.a2a_latency_s * 1e3:.3f} ms; a rank sends {_rate(f.core_copy_bytes_per_s, 'per core it has')}; "
        f"one flow to another host moves {_rate(f.flow_copy_bytes_per_s, '')}"
        f"{f'; the link loses {f.pair_flow_loss:.0%} of its goodput per extra flow between the same two hosts' if f.pair_flow_loss else ''} "
        f"({f.a2a_samples} uncontended forward all-to-alls, timed from the last rank's arrival); "
        f"{GLOO_THREADS} operations of a rank in flight at once (Gloo's threads), the earlier served first",
        (f"  all-to-alls inside a host (loopback): a rank sends {_rate(f.loopback_bytes_per_s, 'per core it has')} "
         + (f"(fitted to the step times of the {f.loopback_step_runs} runs with all-to-alls inside hosts; their "
            f"{f.loopback_samples} uncontended loopback all-to-alls alone give {_rate(f.loopback_sampled_bytes_per_s, '')}, "
            f"swayed by waits for a core; " if f.loopback_step_runs else f"({f.loopback_samples} uncontended ones; ")
         + "the per-core limit above counts bytes to other hosts only); "
         "they lose the allreduce's share of speed beside compute, and their copies take the compute's cores"
         if f.loopback_bytes_per_s else
         f"  intra-host rate {f.intra_factor:.1f}x the host link (assumed; inside a host the per-core limit binds first)"),
        f"  compute per token on one whole core (a run's ranks share its machine's cores): dense fwd {p.dense_fwd_s_per_token * 1e6:.3f} us, bwd {p.dense_bwd_s_per_token * 1e6:.3f} us per layer; "
        f"{f'plus {p.layer_fwd_s * 1e3:.3f} ms fwd, {p.layer_bwd_s * 1e3:.3f} ms bwd per layer whatever the tokens; ' if p.layer_fwd_s or p.layer_bwd_s else ''}"
        f"expert fwd {p.expert_fwd_s_per_token * 1e6:.3f} us, bwd {p.expert_bwd_s_per_token * 1e6:.3f} us per routed token; "
        f"optimizer {p.optimizer_s_per_param * 1e9:.3f} ns per parameter",
        f"  compute time grows as (cores per rank) ** -{f.core_exponent:.2f} when ranks share cores"
        + (f" (** -{f.core_exponent_no_a2a:.2f} in steps without all-to-all)" if f.core_exponent_no_a2a is not None else ""),
        f"  compute speed lost while an all-to-all is in flight {p.slowdown_in_a2a:.1%}, while an allreduce is {p.slowdown_in_allreduce:.1%} "
        f"(collectives share the compute's CPU cores); the last rank to reach an all-to-all computes {p.straggler:.1%} longer than the mean",
        *([f"  note: {f.note}"] if f.note else []),
        *_skew_line(rep.rows),
        "",
        f"  {'config':<52}{'policy':<12}{'skew':>6}{'measured ms':>12}{'predicted ms':>14}{'error':>9}",
    ]
    lines += _table(rep.rows)
    lines.append(f"median |error|: {rep.median_abs_error:.1%} over {len(rep.rows)} runs; "
                 f"{_within(rep.rows)} of {len(rep.rows)} within 10%")
    repeated = [r for r in rep.config_rows if r["runs"] > 1]
    if repeated:
        lines += ["", f"per configuration and policy ({len(repeated)} measured more than once, each pooled: the median of all its runs' steps):",
                  f"  {'config':<52}{'policy':<12}{'runs ms':>16}{'pooled ms':>11}{'predicted ms':>14}{'error':>9}"]
        for r in repeated:
            runs_ms = ", ".join(f"{m * 1e3:.0f}" for m in r["run_medians_s"])
            lines.append(f"  {r['config'][:51]:<52}{r['policy']:<12}{runs_ms:>16}{r['measured_s'] * 1e3:>11.1f}"
                         f"{r['predicted_s'] * 1e3:>14.1f}{r['error']:>+9.1%}")
        lines.append(f"median |error| per configuration: {rep.config_median_abs_error:.1%} over {len(rep.config_rows)} configurations; "
                     f"{_within(rep.config_rows)} of {len(rep.config_rows)} within 10%")
    if rep.holdout_rows:
        lines += ["", "held-out runs (predicted with the parameters above, never fitted to):"] + _table(rep.holdout_rows)
        lines.append(f"held-out median |error|: {rep.holdout_median_abs_error:.1%} over {len(rep.holdout_rows)} runs; "
                     f"{_within(rep.holdout_rows)} of {len(rep.holdout_rows)} within 10%")
    return "\n".join(lines)


def _skew_line(rows: list[dict]) -> list[str]:
    skews = [r.get("a2a_skew", 1.0) for r in rows]
    if not skews or max(skews) <= 1.0:
        return []
    return [f"  routing (an input, not fitted): each run's all-to-all skew (column 'skew': the busiest rank's bytes, or host's where the "
            f"group's ranks share host links, over the mean rank's) is read from its timelines: {min(skews):.2f} to {max(skews):.2f}; "
            "the simulated all-to-alls move the busiest's bytes"]


def _table(rows: list[dict]) -> list[str]:
    return [f"  {r['config'][:51]:<52}{r['policy']:<12}{r.get('a2a_skew', 1.0):>6.2f}{r['measured_s'] * 1e3:>12.1f}"
            f"{r['predicted_s'] * 1e3:>14.1f}{r['error']:>+9.1%}" for r in rows]


def _within(rows: list[dict], bound: float = 0.10) -> int:
    return sum(abs(r["error"]) <= bound for r in rows)


def run_command(root: str | list[str], json_path: str | None, holdout: str | None = None) -> int:
    """``lina sim --calibrate DIR [DIR ...] [--holdout DIR2]``."""
    folders = ", ".join(root) if isinstance(root, (list, tuple)) else root
    print(f"calibrating against the runs under {folders}" + (f"; holding out the runs under {holdout}" if holdout else ""), flush=True)
    rep = calibrate(root, holdout)
    print(report_text(rep))
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rep.to_dict(), indent=2) + "\n")
        from lina.sim.plots import plot_calibration

        png = plot_calibration(rep.rows, rep.holdout_rows, path.with_suffix(".png"), rep.config_rows)
        print(f"wrote {path} and {png}")
    return 0


# --------------------------------------------------------------------------- synthetic runs
def write_synthetic_run(
    path: str | Path,
    cluster: ClusterSpec,
    model: ModelSpec,
    profile: ComputeProfile,
    train: TrainSpec,
    policy: str,
    steps: int = 4,
    jitter: float = 0.0,
    seed: int = 0,
    cpu_count: int | None = None,
) -> TrainResult:
    """Simulate ``policy`` and write a run directory in the trainer's format (flat config).

    Every rank gets the same spans (training is symmetric); ``jitter`` scales each step's spans
    by a random factor in ``[1 - jitter, 1 + jitter]`` so the data are not all alike.
    ``cpu_count``: the cores the run says its ranks shared (default: one per rank); ``profile``
    holds the costs as they were on those cores. With ``train.a2a_skew`` above 1, rank 0 is the
    busiest receiver: its combine spans record ``a2a_skew`` times the mean rank's bytes and the
    other ranks' the rest (so :func:`lina.sim.a2a_skew.a2a_skew` reads it back by rank).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n = cluster.gpus
    if train.a2a_skew > n:
        raise ConfigError("a2a_skew", f"{train.a2a_skew} is more than the {n} ranks can receive", f"use at most {n}")
    result = simulate_step(cluster, model, profile, train, policy)
    others = (n - train.a2a_skew) / (n - 1) if n > 1 else 1.0

    def recorded(rank: int, args: dict) -> dict:
        if train.a2a_skew == 1.0 or args.get("phase") != "combine":
            return args
        return {**args, "bytes": args["bytes"] * (train.a2a_skew if rank == 0 else others)}
    rng = np.random.default_rng(seed)
    timelines = [Timeline(rank) for rank in range(cluster.gpus)]
    offset = 0.0
    step_times = []
    for step in range(steps):
        scale = 1.0 + jitter * (2 * rng.random() - 1)
        for rank, tl in enumerate(timelines):
            for s in result.timeline(rank, 0.0, step).spans():
                tl.record(s.name, s.cat, offset + s.start_s * scale, offset + s.end_s * scale, thread=s.thread, **recorded(rank, s.args))
        step_times.append(result.step_s * scale)
        offset += result.step_s * scale + 1e-3
    for tl in timelines:
        tl.save_jsonl(path / f"timeline-rank{tl.rank}.jsonl")
    config = {
        "layers": model.layers, "d_model": model.d_model, "d_ff": model.d_ff, "experts": model.experts,
        "top_k": model.top_k, "seq_len": model.seq_len, "batch_size": model.batch_size, "vocab": model.vocab,
        "workers": cluster.gpus, "hosts": cluster.hosts, "workers_per_host": cluster.gpus_per_host,
        "link_bps": cluster.link_gbps * 1e9, "policy": policy, "chunk_mb": train.chunk_mb, "bucket_mb": train.bucket_mb,
        "pipeline_chunks": train.lina_a2a_chunks or train.tutel_chunks, "coalesce_small": train.coalesce_small,
        "cpu_count": cpu_count or cluster.gpus,  # the simulator's devices do not share cores unless told
        "a2a_in_flight": cluster.a2a_in_flight,
    }
    summary = {"config": config, "step_time_s_median": statistics.median(step_times[1:] if steps >= 3 else step_times),
               "source": "lina.sim.calibrate.write_synthetic_run"}
    (path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not math.isfinite(summary["step_time_s_median"]):
        raise LinaError("synthetic run produced a non-finite step time")
    return result

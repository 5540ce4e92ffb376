"""Simulate training steps under each policy and measure what the paper reports.

Measures per step: step time, all-to-all time (union of a2a spans) and its share of the step,
backward all-to-all time, allreduce time, exposed communication (step time when compute is
idle), MoE layer forward/backward time, and how busy compute is while an all-to-all is in
flight. ``speedup`` is relative to ``ddp-overlap`` when it was simulated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lina.obs import schema
from lina.obs.timeline import Timeline, union_length
from lina.policy import BASELINE_POLICY, TrainPolicy, train_policy
from lina.policy.packing import REVERT_MARGIN
from lina.sim.collectives import all_to_all
from lina.sim.compute import ComputeProfile
from lina.sim.engine import Executor, Task
from lina.sim.network import INTRA_SUFFIX, Transfer
from lina.sim.spec import ClusterSpec, ModelSpec, TrainSpec, resolve_ep
from lina.sim.topology import Topology
from lina.sim.train_step import StepBuilder, StepPlan, TransferCache


def transfer_time(topo: Topology, transfer: Transfer) -> float:
    """Seconds ``transfer`` takes alone on an idle network."""
    net = topo.network()
    net.start(transfer)
    end = 0.0
    while net.busy():
        end = net.next_event_time()
        net.advance_to(end)
    return end


def _regular(group: int, gpus_per_host: int) -> bool:
    return group % gpus_per_host == 0 or gpus_per_host % group == 0


def packing_rule(plan: StepPlan, topo: Topology, memory_gb: float | None = None) -> dict:
    """Lina's rule at ``plan``'s packing: should experts per GPU double?

    The a2a time of one micro-op is measured by simulating it alone (as Lina's controller
    measures forward micro-ops); the FFN time of a micro-op counts every co-located expert's
    invocation. Returns ``{"pack", "ep", "ffn_micro_s", "a2a_micro_s"}`` plus ``"stop"`` (why
    not) when the answer is no: FFN not shorter, the group cannot halve (one GPU: pure data
    parallelism; or a half that breaks host regularity), ``TrainSpec.max_pack``, or (given
    ``memory_gb``) packed model states that would not fit.
    """
    m, c, t = plan.model, plan.cluster, plan.train
    micro_bytes = min(t.chunk_bytes, m.a2a_bytes)
    tokens = micro_bytes / (m.d_model * m.act_bytes)
    ep, pack = plan.ep, plan.pack
    ffn = plan.expert_time(False, tokens)
    a2a = transfer_time(topo, all_to_all(topo, ep, micro_bytes * t.a2a_skew, t.a2a_algorithm)) if ep > 1 else 0.0
    step = {"pack": pack, "ep": ep, "ffn_micro_s": ffn, "a2a_micro_s": a2a}
    if ffn >= a2a:
        step["stop"] = "ffn >= a2a per micro-op"
    elif ep == 1 or ep % 2 or not _regular(ep // 2, c.gpus_per_host):
        step["stop"] = "group cannot shrink further"
    elif t.max_pack is not None and pack * 2 > t.max_pack:
        step["stop"] = "max_pack"
    elif memory_gb is not None:
        need = StepPlan(c, m, plan.profile, t, ep // 2, pack * 2).local_params() * t.state_bytes_per_param
        if need > memory_gb * 1e9 * t.memory_fraction:
            step["stop"] = f"memory: {need / 1e9:.0f} GB of states > {t.memory_fraction:.0%} of {memory_gb:g} GB"
    return step


@dataclass
class TrainResult:
    """Measured numbers of one simulated step (seconds unless named otherwise)."""

    policy: str
    step_s: float
    a2a_s: float
    fwd_a2a_s: float
    bwd_a2a_s: float
    allreduce_s: float
    compute_s: float
    exposed_comm_s: float
    moe_fwd_s: float
    moe_bwd_s: float
    compute_busy_in_a2a: float
    ep: int
    pack: int
    sim_wall_s: float
    events: int
    speedup: float | None = None
    pack_trace: list[dict] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list, repr=False)

    @property
    def a2a_share(self) -> float:
        return self.a2a_s / self.step_s if self.step_s > 0 else 0.0

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "tasks"}
        out["a2a_share"] = self.a2a_share
        return out

    def timeline(self, rank: int = 0, offset_s: float = 0.0, step: int = 0) -> Timeline:
        """The step as spans of ``rank`` (every rank runs the same program), shifted by ``offset_s``.

        Besides one span per task (thread = stream), it holds what the project's trainer
        records: a ``step`` span, and ``forward`` / ``backward`` compute spans around each
        pass (from the first forward task to the end of ``head.fwd``, and from ``head.bwd`` to
        the last backward compute).
        """
        tl = Timeline(rank)
        tl.record("step", "step", offset_s, offset_s + self.step_s, thread="main", kind=schema.STEP, step=step)
        heads = {t.args.get("phase"): t for t in self.tasks if t.args.get("kind") == schema.HEAD}
        fwd_end, bwd_start = heads["fwd"].end_s, heads["bwd"].start_s
        bwd_end = max(t.end_s for t in self.tasks if t.cat == "compute" and t.args.get("phase") == "bwd")
        tl.record(
            "forward",
            "compute",
            offset_s,
            offset_s + fwd_end,
            thread="main",
            kind=schema.FORWARD,
            phase="fwd",
            step=step,
        )
        tl.record(
            "backward",
            "compute",
            offset_s + bwd_start,
            offset_s + bwd_end,
            thread="main",
            kind=schema.BACKWARD,
            phase="bwd",
            step=step,
        )
        for task in self.tasks:
            tl.record(
                task.name, task.cat, offset_s + task.start_s, offset_s + task.end_s, thread=task.stream, **task.args
            )
        return tl


def _intervals(tasks: list[Task], cat: str, **match) -> list[tuple[float, float]]:
    return [(t.start_s, t.end_s) for t in tasks if t.cat == cat and all(t.args.get(k) == v for k, v in match.items())]


def measure(policy: str, tasks: list[Task], plan: StepPlan, wall_s: float, events: int) -> TrainResult:
    """Reduce a finished task list to the paper's metrics."""
    step = max(t.end_s for t in tasks)
    a2a = _intervals(tasks, "a2a")
    compute = _intervals(tasks, "compute")
    a2a_s = union_length(a2a)
    compute_s = union_length(compute)
    overlap = a2a_s + compute_s - union_length(a2a + compute)
    moe = {"fwd": [], "bwd": []}
    for direction in moe:
        layers: dict[int, list[float]] = {}
        for t in tasks:
            if t.cat == "a2a" and t.args.get("phase") == direction:
                span = layers.setdefault(t.args["layer"], [t.start_s, t.end_s])
                span[0] = min(span[0], t.start_s)
                span[1] = max(span[1], t.end_s)
        moe[direction] = [e - s for s, e in layers.values()]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return TrainResult(
        policy=policy,
        step_s=step,
        a2a_s=a2a_s,
        fwd_a2a_s=union_length(_intervals(tasks, "a2a", phase="fwd")),
        bwd_a2a_s=union_length(_intervals(tasks, "a2a", phase="bwd")),
        allreduce_s=union_length(_intervals(tasks, "allreduce")),
        compute_s=compute_s,
        exposed_comm_s=step - compute_s,
        moe_fwd_s=mean(moe["fwd"]),
        moe_bwd_s=mean(moe["bwd"]),
        compute_busy_in_a2a=overlap / a2a_s if a2a_s > 0 else 0.0,
        ep=plan.ep,
        pack=plan.pack,
        sim_wall_s=wall_s,
        events=events,
        pack_trace=plan.pack_trace,
        tasks=tasks,
    )


def _priority_gate(task: Task, executor: Executor) -> bool:
    """Lina: an allreduce micro-op starts only while no all-to-all runs or waits."""
    if task.cat != "allreduce":
        return True
    return not executor.stream_busy("a2a")


def simulate_step(
    cluster: ClusterSpec,
    model: ModelSpec,
    profile: ComputeProfile,
    train: TrainSpec,
    policy: str | TrainPolicy,
    representative: bool = True,
    memory_gb: float | None = None,
) -> TrainResult:
    """Simulate one training step of ``policy``.

    Args:
        representative: simulate host 0 as the representative of all hosts (exact when every
            host sees the same traffic, which training with uniform routing guarantees);
            ``False`` simulates every flow of every host (slow; for checking).
        memory_gb: device memory, which caps Lina's packing (``None``: no cap).
    """
    pol = train_policy(policy) if isinstance(policy, str) else policy
    started = time.perf_counter()
    topo = Topology(cluster, representative=representative)
    cache = TransferCache(topo, train.a2a_algorithm, train.allreduce_algorithm)
    plan = StepPlan(cluster, model, profile, train, resolve_ep(cluster, model, train))
    tasks, events = _run(plan, pol, topo, cache)
    if pol.packing:
        plan, tasks, events = _pack(plan, pol, topo, cache, tasks, events, memory_gb)
    return measure(pol.name, tasks, plan, time.perf_counter() - started, events)


def _comm_speed(profile: ComputeProfile):
    """Allreduces lose ``allreduce_slowdown_in_compute`` of their speed while the device computes,
    all-to-all bytes inside a host ``loopback_slowdown_in_compute`` (``None`` when they lose
    nothing: the network is left as it is)."""
    slow_ar = profile.allreduce_slowdown_in_compute
    slow_loop = profile.loopback_slowdown_in_compute
    if not slow_ar and not slow_loop:
        return None

    def speeds(ex: Executor) -> dict[str, float]:
        busy = ex.stream_busy("compute")
        return {"allreduce": 1.0 - slow_ar if busy else 1.0, "a2a" + INTRA_SUFFIX: 1.0 - slow_loop if busy else 1.0}

    return speeds


def _run(plan: StepPlan, pol: TrainPolicy, topo: Topology, cache: TransferCache) -> tuple[list[Task], int]:
    tasks = StepBuilder(plan, pol, cache).build()
    window = plan.train.credit_window if pol.grad_sync == "microops" else 1
    profile = plan.profile
    executor = Executor(
        tasks,
        topo.network(),
        {"compute": 1, "a2a": plan.cluster.a2a_in_flight, "allreduce": window},
        _priority_gate if pol.priority else (lambda task, ex: True),
        lambda ex: profile.compute_rate(ex.stream_busy("a2a"), ex.stream_busy("allreduce")),
        first_come=("a2a",),
        comm_speed=_comm_speed(profile),
    )
    executor.run()
    return tasks, executor.events


def _pack(plan, pol, topo, cache, tasks, events, memory_gb):
    """Double experts per GPU while :func:`packing_rule` says so, as the trainer's controller does.

    Like the project's trainer (:mod:`lina.train.packing`, :mod:`lina.policy.packing`), a doubling
    that makes the step slower by more than ``REVERT_MARGIN`` is undone: packing goes back to the
    fastest layout simulated so far and settles (the replicated experts' gradients join the
    allreduce, which the paper's rule does not weigh).
    """
    trace = []
    step_s = max(t.end_s for t in tasks)
    visited = [(step_s, plan, tasks)]
    while True:
        decision = packing_rule(plan, topo, memory_gb)
        decision["step_s"] = step_s
        trace.append(decision)
        if "stop" in decision:
            break
        trial = StepPlan(plan.cluster, plan.model, plan.profile, plan.train, plan.ep // 2, plan.pack * 2)
        trial_tasks, trial_events = _run(trial, pol, topo, cache)
        trial_s = max(t.end_s for t in trial_tasks)
        events += trial_events
        if trial_s > step_s * (1 + REVERT_MARGIN):
            step_s, plan, tasks = min(visited, key=lambda v: v[0])
            decision["stop"] = (
                f"reverted: x{trial.pack} made the step {trial_s / decision['step_s'] - 1:.0%} slower; back to "
                f"x{plan.pack}, the fastest"
            )
            break
        plan, tasks, step_s = trial, trial_tasks, trial_s
        visited.append((step_s, plan, tasks))
    plan.pack_trace = trace
    return plan, tasks, events


def simulate_policies(
    cluster: ClusterSpec,
    model: ModelSpec,
    profile: ComputeProfile,
    train: TrainSpec,
    policies: tuple[str, ...] | list[str],
    representative: bool = True,
    memory_gb: float | None = None,
    progress=None,
) -> dict[str, TrainResult]:
    """Simulate every policy; fill ``speedup`` (``ddp-overlap`` step / policy step) when possible.

    ``progress``: called with each finished :class:`TrainResult` (for a line per policy).
    """
    results = {}
    for p in policies:
        results[p] = simulate_step(cluster, model, profile, train, p, representative, memory_gb)
        if progress is not None:
            progress(results[p])
    if BASELINE_POLICY in results:
        base = results[BASELINE_POLICY].step_s
        for r in results.values():
            r.speedup = base / r.step_s if r.step_s > 0 else None
    return results

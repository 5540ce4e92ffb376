"""One training step as a task graph: forward and backward of every layer, gradient sync.

Every GPU runs the same program (routing is near-uniform in training), so the graph is that of
one GPU; its collectives involve all GPUs and go through the (representative) flow network.

Per layer, forward: dense compute, then for a MoE layer dispatch all-to-all, expert FFN,
combine all-to-all (split into chunks and pipelined when the policy says so). Then the
embedding/LM head forward (``head.fwd``) and backward (``head.bwd``). Backward, last layer first:
combine all-to-all, expert FFN backward, dispatch all-to-all, dense backward. Gradients become ready as their layer's
backward ends; the policy decides how they are allreduced. The optimizer runs when backward
and every allreduce are done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lina.policy import TrainPolicy
from lina.sim.collectives import all_to_all, allreduce
from lina.sim.compute import ComputeProfile
from lina.sim.engine import Task
from lina.sim.network import Transfer
from lina.sim.spec import ClusterSpec, ModelSpec, TrainSpec
from lina.sim.topology import Topology

SMALL_FRACTION = 0.25  # lina.comm.lina_sync.LinaSync's default small_fraction


@dataclass
class StepPlan:
    """Numbers a step graph is built from, after the policy's choices (packing) are made.

    ``ep``: GPUs per expert-parallel group in effect (after packing by ``pack``); each group
    holds every expert once, so a GPU holds ``experts / ep`` experts and each expert has
    ``gpus / ep`` replicas, whose gradients are allreduced among them.
    """

    cluster: ClusterSpec
    model: ModelSpec
    profile: ComputeProfile
    train: TrainSpec
    ep: int
    pack: int = 1
    pack_trace: list[dict] = field(default_factory=list)

    @property
    def experts_per_gpu(self) -> int:
        return self.model.experts // self.ep

    @property
    def replicas(self) -> int:
        return self.cluster.gpus // self.ep

    @property
    def tokens(self) -> int:
        return self.model.tokens

    def expert_time(self, backward: bool, tokens: float | None = None) -> float:
        """Expert FFN time of one GPU for ``tokens`` received tokens (default: a whole layer's)."""
        m = self.model
        received = m.capacity_factor * m.tokens * m.top_k if tokens is None else tokens
        per_expert = received / self.experts_per_gpu
        return self.profile.experts_time(per_expert, self.experts_per_gpu, backward)

    def local_params(self) -> int:
        m = self.model
        expert = m.moe_layers * self.experts_per_gpu * m.expert_params
        return m.total_params - m.moe_layers * m.experts * m.expert_params + expert


class TransferCache:
    """Builds each distinct collective once (layers repeat the same shapes)."""

    def __init__(self, topo: Topology, a2a_algorithm: str, allreduce_algorithm: str = "ring"):
        self.topo = topo
        self.algorithm = a2a_algorithm
        self.allreduce_algorithm = allreduce_algorithm
        self._cache: dict[tuple, Transfer] = {}

    def a2a(self, group: int, nbytes: float) -> Transfer:
        key = ("a2a", group, nbytes)
        if key not in self._cache:
            self._cache[key] = all_to_all(self.topo, group, nbytes, self.algorithm)
        return self._cache[key]

    def allreduce(self, stride: int, ring: int, nbytes: float) -> Transfer:
        key = ("ar", stride, ring, nbytes)
        if key not in self._cache:
            self._cache[key] = allreduce(self.topo, stride, ring, nbytes, self.allreduce_algorithm)
        return self._cache[key]


def a2a_chunks(plan: StepPlan, policy: TrainPolicy) -> int:
    if policy.a2a_split == "tutel":
        return plan.train.tutel_chunks
    if policy.a2a_split == "micro":
        if plan.train.lina_a2a_chunks is not None:
            return plan.train.lina_a2a_chunks
        return max(1, math.ceil(plan.model.a2a_bytes / plan.train.chunk_bytes - 1e-9))
    return 1


class StepBuilder:
    """Appends the tasks of one step for ``policy``; :meth:`build` returns them."""

    def __init__(self, plan: StepPlan, policy: TrainPolicy, cache: TransferCache):
        self.plan = plan
        self.policy = policy
        self.cache = cache
        self.tasks: list[Task] = []
        self.grads: list[tuple[str, float, int, str]] = []  # (name, bytes, ready task, group)

    def add(self, task: Task) -> int:
        self.tasks.append(task)
        return len(self.tasks) - 1

    def compute(self, name: str, seconds: float, dep: int | tuple[int, ...] | None, **args) -> int:
        deps = () if dep is None else (dep,) if isinstance(dep, int) else tuple(dep)
        return self.add(Task(name, "compute", "compute", deps, duration_s=seconds, args=args))

    def build(self) -> list[Task]:
        p, m = self.plan, self.plan.model
        prev = None
        for layer in range(m.layers):
            prev = self.compute(
                f"fwd.dense.L{layer}", p.profile.dense_time(m.tokens), prev, layer=layer, kind="dense", phase="fwd"
            )
            if m.is_moe(layer):
                prev = self._moe(layer, prev, "fwd")
            else:
                ffn = p.profile.expert_time(m.tokens)
                prev = self.compute(f"fwd.ffn.L{layer}", ffn, prev, layer=layer, kind="dense", phase="fwd")
        prev = self.compute("head.fwd", p.profile.head_fwd_s_per_token * m.tokens, prev, kind="head", phase="fwd")
        prev = self.compute("head.bwd", p.profile.head_bwd_s_per_token * m.tokens, prev, kind="head", phase="bwd")
        for layer in reversed(range(m.layers)):
            if m.is_moe(layer):
                prev = self._moe(layer, prev, "bwd")
            else:
                ffn = p.profile.expert_time(m.tokens, backward=True)
                prev = self.compute(f"bwd.ffn.L{layer}", ffn, prev, layer=layer, kind="dense", phase="bwd")
            prev = self.compute(
                f"bwd.dense.L{layer}",
                p.profile.dense_time(m.tokens, backward=True),
                prev,
                layer=layer,
                kind="dense",
                phase="bwd",
            )
            for name, numel in reversed(m.dense_tensors(layer)):
                self.grads.append((name, numel * m.grad_bytes, prev, "dp"))
        for name, numel in reversed(m.embedding_tensors()):
            self.grads.append((name, numel * m.grad_bytes, prev, "dp"))
        syncs = self._grad_sync(last_backward=prev)
        optimizer = p.profile.optimizer_s_per_param * p.local_params()
        self.add(
            Task("optimizer", "compute", "compute", (prev, *syncs), duration_s=optimizer, args={"kind": "optimizer"})
        )
        return self.tasks

    # ------------------------------------------------------------------ MoE layer
    def _moe(self, layer: int, prev: int, direction: str) -> int | tuple[int, ...]:
        """Tasks of one MoE layer after ``prev``; returns what the next compute waits for (every
        second all-to-all micro-op: with more than one in flight they may end out of order)."""
        p, m = self.plan, self.plan.model
        chunks = a2a_chunks(p, self.policy)
        nbytes = m.a2a_bytes / chunks
        backward = direction == "bwd"
        ffn = p.expert_time(backward) / chunks
        first, second = ("combine", "dispatch") if backward else ("dispatch", "combine")
        if p.ep == 1:  # every expert is local (pure data parallelism): no all-to-all is issued
            ffn_all = self.compute(
                f"{direction}.expert.L{layer}",
                p.expert_time(backward),
                prev,
                layer=layer,
                kind="expert",
                phase=direction,
                micro_op=0,
            )
            self._expert_grads(layer, backward, ffn_all)
            return ffn_all
        a2a = self.cache.a2a(p.ep, nbytes * p.train.a2a_skew)  # the busiest rank's bytes: it ends the exchange
        sent = nbytes * (p.ep - 1) / p.ep  # the mean rank's, to other ranks, as the trainer's spans record it
        if not backward and p.train.count_exchange:
            counts = 8.0 * m.experts
            prev = self.add(
                Task(
                    f"fwd.counts.L{layer}",
                    "a2a",
                    "a2a",
                    (prev,),
                    transfer=self.cache.a2a(p.ep, counts),
                    args={"kind": "counts", "layer": layer, "phase": "fwd", "bytes": counts},
                )
            )
        firsts = [
            self.add(
                Task(
                    f"{direction}.{first}.L{layer}.c{j}",
                    "a2a",
                    "a2a",
                    (prev,),
                    transfer=a2a,
                    args={"kind": first, "layer": layer, "phase": direction, "bytes": sent, "micro_op": j},
                )
            )
            for j in range(chunks)
        ]
        ffns = [
            self.add(
                Task(
                    f"{direction}.expert.L{layer}.c{j}",
                    "compute",
                    "compute",
                    (firsts[j],),
                    duration_s=ffn,
                    args={"kind": "expert", "layer": layer, "phase": direction, "micro_op": j},
                )
            )
            for j in range(chunks)
        ]
        seconds = [
            self.add(
                Task(
                    f"{direction}.{second}.L{layer}.c{j}",
                    "a2a",
                    "a2a",
                    (ffns[j],),
                    transfer=a2a,
                    args={"kind": second, "layer": layer, "phase": direction, "bytes": sent, "micro_op": j},
                )
            )
            for j in range(chunks)
        ]
        self._expert_grads(layer, backward, ffns[-1])
        return tuple(seconds)

    def _expert_grads(self, layer: int, backward: bool, ready: int) -> None:
        """Replicated experts' gradients join the allreduce once their backward FFN is done."""
        p, m = self.plan, self.plan.model
        if backward and p.replicas > 1:
            w1 = (m.d_model * m.d_ff + m.d_ff) * m.grad_bytes
            w2 = (m.d_ff * m.d_model + m.d_model) * m.grad_bytes
            for e in range(p.experts_per_gpu):
                self.grads.append((f"L{layer}.expert{e}.w2", w2, ready, "expert"))
                self.grads.append((f"L{layer}.expert{e}.w1", w1, ready, "expert"))

    # -------------------------------------------------------------- gradient sync
    def _allreduce(self, name: str, nbytes: float, deps: tuple[int, ...], group: str, **args) -> int:
        p = self.plan
        n = p.cluster.gpus
        if group == "dp":
            transfer = self.cache.allreduce(1, n, nbytes)
        else:
            transfer = self.cache.allreduce(p.ep, p.replicas, nbytes)
        args = {"kind": "allreduce", "bytes": nbytes, "group": group, **args}
        return self.add(Task(name, "allreduce", "allreduce", deps, transfer=transfer, args=args))

    def _grad_sync(self, last_backward: int) -> list[int]:
        sync = self.policy.grad_sync
        if sync == "none":
            return []
        out = []
        if sync == "microops":
            chunk = self.plan.train.chunk_bytes
            small: list = []  # as the real lina policy: dense tensors under a quarter chunk share micro-ops

            def flush_small() -> None:
                if small:
                    out.append(
                        self._allreduce(
                            f"allreduce.small{len(out)}",
                            sum(b for b, _ in small),
                            (small[-1][1],),
                            "dp",
                            tensor="small",
                        )
                    )
                    small.clear()

            for name, nbytes, ready, group in self.grads:
                if self.plan.train.coalesce_small and group == "dp" and nbytes < SMALL_FRACTION * chunk:
                    small.append((nbytes, ready))
                    if sum(b for b, _ in small) >= chunk:
                        flush_small()
                    continue
                pieces = max(1, math.ceil(nbytes / chunk - 1e-9))
                for j in range(pieces):
                    size = min(chunk, nbytes - j * chunk)
                    out.append(self._allreduce(f"allreduce.{name}.c{j}", size, (ready,), group, tensor=name))
            flush_small()
            return out
        cap = self.plan.train.bucket_bytes
        open_buckets: dict[str, list] = {}
        count = 0

        def flush(group: str) -> None:
            nonlocal count
            nbytes, ready = open_buckets.pop(group)
            dep = last_backward if sync == "after" else ready
            out.append(self._allreduce(f"allreduce.bucket{count}", nbytes, (dep,), group, bucket=count))
            count += 1

        for _, nbytes, ready, group in self.grads:
            bucket = open_buckets.setdefault(group, [0.0, ready])
            bucket[0] += nbytes
            bucket[1] = ready
            if bucket[0] >= cap:
                flush(group)
        for group in list(open_buckets):
            flush(group)
        return out

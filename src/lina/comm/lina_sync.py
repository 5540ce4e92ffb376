"""The ``lina`` gradient-sync policy: every gradient tensor split into equal chunks, each chunk one
allreduce micro-op through the per-rank priority scheduler, so that every all-to-all goes first;
all-to-alls pipelined with expert compute.

Chunks of a large tensor are views of its gradient (no copy, never mixed with another tensor).
Tensors smaller than ``small_fraction`` of a chunk (LayerNorm weights, biases, the router) would
each be a latency-bound micro-op of a few KB; with ``coalesce_small`` they are packed, in
gradient-ready order, into shared micro-ops of at most one chunk (one copy in, one copy out).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lina.comm.collective_check import collective_label
from lina.comm.gradsync import GradSync, _grad, _unflatten_into
from lina.comm.partition import partition
from lina.comm.scheduler import CommScheduler, MicroOp, SchedulerConfig
from lina.obs import schema


class _SmallGroup:
    """Small tensors that share one micro-op; submitted when the last one's gradient is ready."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.pending = len(params)
        self.buffer: torch.Tensor | None = None


class LinaSync(GradSync):
    """Args (beyond :class:`GradSync`'s): ``chunk_mb`` micro-op size; ``credit`` allreduce
    micro-ops in flight during backward (``flush_credit`` after it); ``coalesce_small`` and
    ``small_fraction`` as in the module docstring."""

    name = "lina"
    pipelined = True

    def __init__(
        self,
        *args,
        chunk_mb: float = 1.0,
        credit: int = 1,
        flush_credit: int = 4,
        coalesce_small: bool = True,
        small_fraction: float = 0.25,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.chunk_bytes = max(1, int(chunk_mb * 1024 * 1024))
        self.scheduler = CommScheduler(
            self.timeline,
            SchedulerConfig(credit=credit, flush_credit=flush_credit, timeout_s=self.timeout_s, name="lina-sched"),
        )
        self._names = {id(p): n for n, p in self.model.named_parameters()}
        self._groups: list[_SmallGroup] = []
        self._group_of: dict[int, _SmallGroup] = {}
        if coalesce_small:
            self._build_groups(
                [p for p in self.dense_params if p.numel() * p.element_size() < small_fraction * self.chunk_bytes]
            )
        self._handles = [p.register_post_accumulate_grad_hook(self._submit_dense) for p in self.dense_params]
        if self.expert_dp_group is not None:
            self._handles += [p.register_post_accumulate_grad_hook(self._submit_expert) for p in self.expert_params]

    def _build_groups(self, small: list[nn.Parameter]) -> None:
        current: list[nn.Parameter] = []
        size = 0
        for p in small:  # in gradient-ready order (reverse registration)
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= self.chunk_bytes:
                self._groups.append(_SmallGroup(current))
                current, size = [], 0
        if current:
            self._groups.append(_SmallGroup(current))
        self._group_of = {id(p): g for g in self._groups for p in g.params}

    def a2a_begin(self, name: str, nbytes: int) -> MicroOp:
        return self.scheduler.a2a_begin(name, nbytes)

    def a2a_end(self, token: Any) -> None:
        self.scheduler.a2a_end(token)

    def on_backward_reaches_moe(self) -> None:
        self.scheduler.hold()

    def begin_step(self) -> None:
        for g in self._groups:
            g.pending = len(g.params)
            g.buffer = None

    def _submit(self, p: nn.Parameter, group: dist.ProcessGroup | None) -> None:
        if group is None:
            return
        name = self._names.get(id(p), "param")
        with self.timeline.span("partition", "sched", kind=schema.PARTITION):
            chunks = partition(_grad(p), self.chunk_bytes)
        for k, chunk in enumerate(chunks):
            self.scheduler.submit_allreduce(
                name,
                chunk.numel() * chunk.element_size(),
                lambda c=chunk, k=k: _all_reduce(c, group, f"{name}.{k}"),
                index=k,
            )

    def _submit_group(self, g: _SmallGroup) -> None:
        if self.dp_group is None:
            return
        with self.timeline.span("partition", "sched", kind=schema.PARTITION):
            g.buffer = torch.cat([_grad(p).reshape(-1) for p in g.params])
        buf = g.buffer
        self.scheduler.submit_allreduce(
            f"small{self._groups.index(g)}",
            buf.numel() * buf.element_size(),
            lambda: _all_reduce(buf, self.dp_group, f"small{self._groups.index(g)}"),
        )

    def _submit_dense(self, p: nn.Parameter) -> None:
        g = self._group_of.get(id(p))
        if g is None:
            self._submit(p, self.dp_group)
            return
        g.pending -= 1
        if g.pending == 0:
            self._submit_group(g)

    def _submit_expert(self, p: nn.Parameter) -> None:
        self._submit(p, self.expert_dp_group)

    def finish(self) -> None:
        for g in self._groups:  # groups with a parameter that got no gradient this step
            if g.buffer is None and g.pending > 0:
                g.pending = 0
                self._submit_group(g)
        self.scheduler.flush(self.timeout_s)
        for g in self._groups:
            if g.buffer is not None:
                with self.timeline.span("partition", "sched", kind=schema.PARTITION):
                    _unflatten_into(g.buffer, [_grad(p) for p in g.params], 1)
        for p in self.dense_params + self.expert_params:
            _grad(p).div_(self.world_size)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.scheduler.close()


def _all_reduce(t: torch.Tensor, group: dist.ProcessGroup, label: str):
    """Start one allreduce micro-op, named for the collective check (lina.comm.collective_check)."""
    with collective_label(label):
        return dist.all_reduce(t, group=group, async_op=True)

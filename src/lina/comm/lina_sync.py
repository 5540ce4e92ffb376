"""The ``lina`` gradient-sync policy: every gradient tensor split into equal chunks (never mixing
tensors), each chunk one allreduce micro-op through the per-rank priority scheduler, so that
every all-to-all goes first; all-to-alls pipelined with expert compute."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from lina.comm.gradsync import GradSync, _grad
from lina.comm.partition import partition
from lina.comm.scheduler import CommScheduler, MicroOp, SchedulerConfig


class LinaSync(GradSync):
    """Args (beyond :class:`GradSync`'s): ``chunk_mb`` micro-op size; ``credit`` allreduce
    micro-ops in flight at once."""

    name = "lina"
    pipelined = True

    def __init__(self, *args, chunk_mb: float = 1.0, credit: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.chunk_bytes = max(1, int(chunk_mb * 1024 * 1024))
        self.scheduler = CommScheduler(self.timeline, SchedulerConfig(credit=credit, timeout_s=self.timeout_s, name="lina-sched"))
        self._names = {id(p): n for n, p in self.model.named_parameters()}
        self._handles = [p.register_post_accumulate_grad_hook(self._submit_dense) for p in self.dense_params]
        if self.expert_dp_group is not None:
            self._handles += [p.register_post_accumulate_grad_hook(self._submit_expert) for p in self.expert_params]

    def a2a_begin(self, name: str, nbytes: int) -> MicroOp:
        return self.scheduler.a2a_begin(name, nbytes)

    def a2a_end(self, token: Any) -> None:
        self.scheduler.a2a_end(token)

    def on_backward_reaches_moe(self) -> None:
        self.scheduler.hold()

    def _submit(self, p: nn.Parameter, group: dist.ProcessGroup | None) -> None:
        if group is None:
            return
        name = self._names.get(id(p), "param")
        with self.timeline.span("partition", "sched"):
            chunks = partition(_grad(p), self.chunk_bytes)
        for k, chunk in enumerate(chunks):
            self.scheduler.submit_allreduce(
                name, chunk.numel() * chunk.element_size(),
                lambda c=chunk: dist.all_reduce(c, group=group, async_op=True), index=k,
            )

    def _submit_dense(self, p: nn.Parameter) -> None:
        self._submit(p, self.dp_group)

    def _submit_expert(self, p: nn.Parameter) -> None:
        self._submit(p, self.expert_dp_group)

    def finish(self) -> None:
        self.scheduler.flush(self.timeout_s)
        for p in self.dense_params + self.expert_params:
            _grad(p).div_(self.world_size)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.scheduler.close()

"""Gradient-sync policies: how data-parallel gradients are allreduced during and after backward.

A policy is an object the trainer calls at fixed points; benchmarks swap the policy and nothing
else. Non-expert gradients are summed over the data-parallel group (all ranks); gradients of
experts that are replicated across expert-parallel groups are summed over their expert-data-parallel
group. Both are then divided by the world size, which makes the update equal to the one a single
process computes on the concatenated batch.

Policies here:
  ``sequential``  every allreduce after backward, bucket by bucket, blocking.
  ``ddp-overlap`` DDP-style buckets (25 MB default) allreduced asynchronously on their own process
                  group as soon as all their gradients are ready, concurrently with the
                  synchronous all-to-alls (DeepSpeed-MoE's schedule as lina runs it; formerly
                  called ``deepspeed``).
"""

from __future__ import annotations

import abc
import threading
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lina.comm.collective_check import collective_label
from lina.obs import schema
from lina.obs.timeline import Timeline


def is_expert(p: nn.Parameter) -> bool:
    return bool(getattr(p, "lina_expert", False))


def make_buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Group parameters, in the order given, into buckets of at most ``bucket_bytes`` (a tensor
    larger than a bucket gets a bucket of its own)."""
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if buckets and size + nbytes <= bucket_bytes:
            buckets[-1].append(p)
            size += nbytes
        else:
            buckets.append([p])
            size = nbytes
    return buckets


class GradSync(abc.ABC):
    """Base policy: the interface and the shared bookkeeping.

    Args:
        model: the model whose ``.grad`` tensors are synchronised in place.
        dp_group: group over which non-expert gradients are summed (None: single process).
        expert_dp_group: group over which expert gradients are summed (None or size 1: none).
        world_size: divisor that turns sums into the mean update.
        timeline: the rank's timeline; every allreduce is a span there.
        bucket_mb: bucket size of bucketed policies.
        timeout_s: bound on waiting for a collective.
    """

    name = "base"

    def __init__(
        self,
        model: nn.Module,
        dp_group: dist.ProcessGroup | None,
        expert_dp_group: dist.ProcessGroup | None,
        world_size: int,
        timeline: Timeline,
        bucket_mb: float = 25.0,
        timeout_s: float = 120.0,
    ):
        self.model = model
        self.dp_group = dp_group
        self.expert_dp_group = (
            expert_dp_group if expert_dp_group is not None and dist.get_world_size(expert_dp_group) > 1 else None
        )
        self.world_size = world_size
        self.timeline = timeline
        self.bucket_bytes = int(bucket_mb * 1024 * 1024)
        self.timeout_s = timeout_s
        params = [p for p in model.parameters() if p.requires_grad]
        # Reverse registration order approximates the order in which backward produces gradients.
        self.dense_params = [p for p in reversed(params) if not is_expert(p)]
        self.expert_params = [p for p in reversed(params) if is_expert(p)]

    #: whether the MoE layers pipeline their all-to-alls with expert compute under this policy
    pipelined = False

    # Hooks the MoE layers call (through ExpertComm); plain policies do nothing there.
    def a2a_begin(self, name: str, nbytes: int) -> Any:
        return None

    def a2a_end(self, token: Any) -> None:
        return None

    def on_backward_reaches_moe(self) -> None:
        return None

    def begin_step(self) -> None:
        """Called before forward."""

    @abc.abstractmethod
    def finish(self) -> None:
        """Called after ``loss.backward()``: when it returns, every ``.grad`` holds the mean."""

    def close(self) -> None:
        """Release threads and hooks."""

    # Shared helpers.
    def _allreduce_flat(self, params: list[nn.Parameter], group: dist.ProcessGroup | None, name: str) -> None:
        """Blocking sum-allreduce of the gradients of ``params`` through one flat buffer."""
        grads = [_grad(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if group is not None:
            nbytes = flat.numel() * flat.element_size()
            with self.timeline.span(name, "allreduce", kind=schema.ALLREDUCE, bytes=nbytes), collective_label(name):
                dist.all_reduce(flat, group=group)
        _unflatten_into(flat, grads, self.world_size)

    def _sync_experts_blocking(self) -> None:
        if not self.expert_params:
            return
        if self.expert_dp_group is None:
            for p in self.expert_params:
                _grad(p).div_(self.world_size)
            return
        for i, bucket in enumerate(make_buckets(self.expert_params, self.bucket_bytes)):
            self._allreduce_flat(bucket, self.expert_dp_group, f"expert-bucket{i}")


def _grad(p: nn.Parameter) -> torch.Tensor:
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def _unflatten_into(flat: torch.Tensor, grads: list[torch.Tensor], divisor: int) -> None:
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g)).div_(divisor)
        offset += n


class NoSync(GradSync):
    """No gradient traffic at all (timing only: each rank steps on its own gradients, so ranks
    drift apart). The measured lower bound of a policy is that policy with this sync: its
    all-to-alls alone on the links, nothing to hide."""

    name = "no-sync"

    def finish(self) -> None:
        return None


class SequentialSync(GradSync):
    """Every allreduce after backward, one bucket at a time (no overlap with anything)."""

    name = "sequential"

    def finish(self) -> None:
        for i, bucket in enumerate(make_buckets(self.dense_params, self.bucket_bytes)):
            self._allreduce_flat(bucket, self.dp_group, f"bucket{i}")
        self._sync_experts_blocking()


class BucketedAsyncSync(GradSync):
    """DDP / DeepSpeed-MoE style: a bucket's allreduce starts, asynchronously, as soon as the last
    of its gradients is accumulated during backward; ``finish`` waits for all of them."""

    name = "ddp-overlap"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buckets = make_buckets(self.dense_params, self.bucket_bytes)
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._pending = [0] * len(self.buckets)
        self._works: list[tuple[dist.Work, torch.Tensor, int]] = []
        self._lock = threading.Lock()
        self._handles = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in self.dense_params]

    def begin_step(self) -> None:
        self._pending = [len(b) for b in self.buckets]
        self._works = []

    def _grad_ready(self, p: nn.Parameter) -> None:
        i = self._bucket_of[id(p)]
        self._pending[i] -= 1
        if self._pending[i] == 0:
            self._launch(i)

    def _launch(self, i: int) -> None:
        bucket = self.buckets[i]
        flat = torch.cat([_grad(p).reshape(-1) for p in bucket])
        if self.dp_group is None:
            self._works.append((None, flat, i))
            return
        nbytes = flat.numel() * flat.element_size()
        start = self.timeline.now()
        with collective_label(f"bucket{i}"):
            work = dist.all_reduce(flat, group=self.dp_group, async_op=True)
        timeline = self.timeline
        work.get_future().add_done_callback(
            lambda fut, start=start, i=i, nbytes=nbytes: timeline.record(
                f"bucket{i}",
                "allreduce",
                start,
                timeline.now(),
                thread="allreduce",
                kind=schema.ALLREDUCE,
                bytes=nbytes,
            )
        )
        self._works.append((work, flat, i))

    def finish(self) -> None:
        launched = {i for _, _, i in self._works}
        for i in range(len(self.buckets)):  # buckets whose hooks did not fire (unused parameters)
            if i not in launched:
                self._launch(i)
        for work, flat, i in self._works:
            if work is not None:
                work.wait()
            _unflatten_into(flat, [_grad(p) for p in self.buckets[i]], self.world_size)
        self._works = []
        self._sync_experts_blocking()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

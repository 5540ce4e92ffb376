"""All-to-all with uneven splits, synchronous (as an autograd function) or asynchronous (for
pipelining), timed once on the one timeline."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lina.comm.collective_check import collective_label
from lina.moe.comm_context import ExpertComm
from lina.obs import schema


def _row_bytes(x: torch.Tensor) -> int:
    return x.element_size() * (x[0].numel() if x.shape[0] else int(torch.tensor(x.shape[1:]).prod()))


def all_to_all(
    x: torch.Tensor,
    out_splits: list[int],
    in_splits: list[int],
    comm: ExpertComm,
    name: str,
    phase: str,
    kind: str = schema.ALLTOALL,
    layer: int | None = None,
) -> torch.Tensor:
    """Synchronous ``all_to_all_single`` of the rows of ``x`` (no autograd).

    Args:
        x: Tensor[sum(in_splits), ...], rows grouped by destination rank.
        out_splits: rows received from each rank; in_splits: rows sent to each rank.
        name: the span's label; phase, kind, layer: its fields (:mod:`lina.obs.schema`).
    Returns:
        Tensor[sum(out_splits), ...], rows grouped by source rank.
    """
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    nbytes = _row_bytes(x) * (sum(in_splits) - in_splits[comm.rank])
    token = comm.a2a_begin(name, nbytes)
    try:
        with (
            comm.timeline.span(name, "a2a", kind=kind, layer=layer, phase=phase, bytes=nbytes),
            collective_label(f"{name}.{phase}"),
        ):
            dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=comm.group)
    finally:
        comm.a2a_end(token)
    return out


class AsyncAllToAll:
    """One asynchronous all-to-all micro-op; its span ends when the transfer completes (recorded
    from the completion callback, not when somebody waits for it).

    ``start`` issues it; ``wait`` blocks until done and returns the received rows.
    """

    def __init__(
        self,
        x: torch.Tensor,
        out_splits: list[int],
        in_splits: list[int],
        comm: ExpertComm,
        name: str,
        phase: str,
        index: int,
        kind: str = schema.ALLTOALL,
        layer: int | None = None,
    ):
        self.out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        self.comm = comm
        nbytes = _row_bytes(x) * (sum(in_splits) - in_splits[comm.rank])
        self._token = comm.a2a_begin(name, nbytes)
        start = comm.timeline.now()
        with collective_label(f"{name}.{phase}.{index}"):
            self._work = dist.all_to_all_single(
                self.out, x.contiguous(), out_splits, in_splits, group=comm.group, async_op=True
            )
        timeline = comm.timeline

        def done(_fut, token=self._token):
            timeline.record(
                name, "a2a", start, timeline.now(), kind=kind, layer=layer, phase=phase, bytes=nbytes, micro_op=index
            )
            comm.a2a_end(token)

        self._work.get_future().add_done_callback(done)

    def wait(self) -> torch.Tensor:
        self._work.wait()
        return self.out


class AllToAll(torch.autograd.Function):
    """Differentiable all-to-all: backward sends gradients back along the reversed splits.
    ``kind`` and ``layer`` are the spans' fields (:mod:`lina.obs.schema`)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, comm, name, kind=schema.ALLTOALL, layer=None):
        ctx.splits = (out_splits, in_splits)
        ctx.comm = comm
        ctx.label = (name, kind, layer)
        return all_to_all(x, out_splits, in_splits, comm, name, "fwd", kind, layer)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        name, kind, layer = ctx.label
        grad_x = all_to_all(grad, in_splits, out_splits, ctx.comm, name, "bwd", kind, layer)
        return grad_x, None, None, None, None, None, None


def exchange_counts(send_counts: torch.Tensor, comm: ExpertComm) -> torch.Tensor:
    """Tell every peer how many rows each of its local experts gets from this rank.

    Args:
        send_counts: LongTensor[E], rows this rank sends to each global expert (experts of rank r
            are ``r*E_l .. (r+1)*E_l - 1``).
    Returns:
        LongTensor[P, E_l]: rows this rank receives from each source rank for each local expert.
    """
    recv = all_to_all(
        send_counts.view(-1, 1),
        [send_counts.numel() // comm.size] * comm.size,
        [send_counts.numel() // comm.size] * comm.size,
        comm,
        "counts",
        "fwd",
        schema.COUNTS,
    )
    return recv.view(comm.size, -1)

"""All-to-all with uneven splits as autograd functions, timed on the one timeline."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lina.moe.comm_context import ExpertComm


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], comm: ExpertComm, name: str, phase: str) -> torch.Tensor:
    """Synchronous ``all_to_all_single`` of the rows of ``x`` (no autograd).

    Args:
        x: Tensor[sum(in_splits), ...], rows grouped by destination rank.
        out_splits: rows received from each rank; in_splits: rows sent to each rank.
    Returns:
        Tensor[sum(out_splits), ...], rows grouped by source rank.
    """
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    nbytes = x.element_size() * x[0].numel() * (sum(in_splits) - in_splits[comm.rank]) if x.shape[0] else 0
    with comm.a2a_guard(name, nbytes), comm.timeline.span(name, "a2a", phase=phase, bytes=nbytes):
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=comm.group)
    return out


class AllToAll(torch.autograd.Function):
    """Differentiable all-to-all: backward sends gradients back along the reversed splits."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, comm, name):
        ctx.splits = (out_splits, in_splits)
        ctx.comm = comm
        ctx.name = name
        return all_to_all(x, out_splits, in_splits, comm, name, "fwd")

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return all_to_all(grad, in_splits, out_splits, ctx.comm, ctx.name, "bwd"), None, None, None, None


def exchange_counts(send_counts: torch.Tensor, comm: ExpertComm) -> torch.Tensor:
    """Tell every peer how many rows each of its local experts gets from this rank.

    Args:
        send_counts: LongTensor[E], rows this rank sends to each global expert (experts of rank r
            are ``r*E_l .. (r+1)*E_l - 1``).
    Returns:
        LongTensor[P, E_l]: rows this rank receives from each source rank for each local expert.
    """
    p = comm.size
    recv = torch.empty_like(send_counts)
    with comm.a2a_guard("counts", send_counts.numel() * 8), comm.timeline.span("counts", "a2a", phase="fwd", bytes=send_counts.numel() * 8):
        dist.all_to_all_single(recv, send_counts.contiguous(), group=comm.group)
    return recv.view(p, -1)

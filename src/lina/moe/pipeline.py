"""Pipelined expert exchange: dispatch and combine all-to-alls split into micro-ops along tokens,
the local experts computing on micro-op j while micro-op j+1 is in flight, in forward and backward.

Every rank issues the same micro-ops in the same program order on the EP group (dispatches first,
then each combine as soon as its experts are done), so no rank waits for a collective that a peer
issues later.
"""

from __future__ import annotations

import torch

from lina.comm.partition import a2a_micro_rows, split_a2a
from lina.moe.alltoall import AsyncAllToAll
from lina.moe.comm_context import ExpertComm
from lina.moe.experts import LocalExperts
from lina.moe.permute import inverse_permutation, source_to_expert_major
from lina.obs import schema


def micro_counts(recv_counts: torch.Tensor, m: int) -> list[torch.Tensor]:
    """Rows per (source, local expert) in each receive micro-op.

    Source p's rows for this rank are ordered by local expert (``recv_counts[p]`` each) and cut
    into m contiguous pieces by :func:`lina.comm.partition.split_a2a`.

    Args:
        recv_counts: LongTensor[P, E_l].
    Returns:
        m LongTensors [P, E_l] that sum to ``recv_counts``.
    """
    p_count, el = recv_counts.shape
    pieces = split_a2a(recv_counts.sum(1).tolist(), m)
    bounds = torch.cumsum(recv_counts, 1)  # [P, E_l] end offset of each expert's rows
    starts_e = bounds - recv_counts
    out = []
    offset = torch.zeros(p_count, dtype=torch.long)
    for j in range(m):
        length = torch.tensor(pieces[j], dtype=torch.long)
        lo, hi = offset[:, None], (offset + length)[:, None]
        out.append((torch.minimum(hi, bounds) - torch.maximum(lo, starts_e)).clamp_min(0))
        offset = offset + length
    return out


class _Plan:
    """Splits and index maps of one pipelined exchange (computed once, used fwd and bwd)."""

    def __init__(self, send_splits: list[int], recv_counts: torch.Tensor, m: int):
        device = recv_counts.device  # index maps are built on the CPU, used where the rows live
        recv_counts = recv_counts.cpu()
        recv_splits = recv_counts.sum(1).tolist()
        self.m = m
        self.send = split_a2a(send_splits, m)  # [m][P] rows sent to each peer
        self.recv = split_a2a(recv_splits, m)  # [m][P] rows received from each peer
        self.send_rows = [r.to(device) for r in a2a_micro_rows(send_splits, m)]  # rows of the send buffer per micro-op
        self.counts = micro_counts(recv_counts, m)
        self.to_expert_major = [source_to_expert_major(c).to(device) for c in self.counts]
        self.to_source_major = [inverse_permutation(i) for i in self.to_expert_major]
        self.expert_counts = [c.sum(0).tolist() for c in self.counts]


class PipelinedExchange(torch.autograd.Function):
    """rows [S, d] grouped by destination -> expert outputs for the same rows [S, d].

    The local experts run inside this function on detached inputs with their own small graphs;
    backward runs those graphs micro-op by micro-op (expert parameter gradients accumulate as
    usual) between the pipelined backward all-to-alls.
    """

    @staticmethod
    def forward(
        ctx,
        rows,
        send_splits,
        recv_counts,
        experts: LocalExperts,
        comm: ExpertComm,
        name: str,
        layer: int | None = None,
    ):
        plan = _Plan(send_splits, recv_counts, comm.pipeline_chunks)
        tl = comm.timeline
        dispatches = [
            AsyncAllToAll(
                rows[plan.send_rows[j]],
                plan.recv[j],
                plan.send[j],
                comm,
                f"{name}.dispatch",
                "fwd",
                j,
                schema.DISPATCH,
                layer,
            )
            for j in range(plan.m)
        ]
        inputs, outputs, combines = [], [], []
        for j in range(plan.m):
            received = dispatches[j].wait()
            expert_span = tl.span(
                f"{name}.experts", "compute", kind=schema.EXPERT, layer=layer, phase="fwd", micro_op=j
            )
            with expert_span, torch.enable_grad():
                x = received[plan.to_expert_major[j]].detach().requires_grad_()
                y = experts(x, plan.expert_counts[j])
            inputs.append(x)
            outputs.append(y)
            combines.append(
                AsyncAllToAll(
                    y.detach()[plan.to_source_major[j]],
                    plan.send[j],
                    plan.recv[j],
                    comm,
                    f"{name}.combine",
                    "fwd",
                    j,
                    schema.COMBINE,
                    layer,
                )
            )
        out = rows.new_empty(rows.shape)
        for j in range(plan.m):
            out[plan.send_rows[j]] = combines[j].wait()
        ctx.plan, ctx.inputs, ctx.outputs, ctx.comm, ctx.name, ctx.layer = plan, inputs, outputs, comm, name, layer
        return out

    @staticmethod
    def backward(ctx, grad_out):
        plan, comm, name, layer = ctx.plan, ctx.comm, ctx.name, ctx.layer
        tl = comm.timeline
        grad_out = grad_out.contiguous()
        combines = [
            AsyncAllToAll(
                grad_out[plan.send_rows[j]],
                plan.recv[j],
                plan.send[j],
                comm,
                f"{name}.combine",
                "bwd",
                j,
                schema.COMBINE,
                layer,
            )
            for j in range(plan.m)
        ]
        dispatches = []
        for j in range(plan.m):
            grad_y = combines[j].wait()[plan.to_expert_major[j]]
            x, y = ctx.inputs[j], ctx.outputs[j]
            with tl.span(f"{name}.experts.bwd", "compute", kind=schema.EXPERT, layer=layer, phase="bwd", micro_op=j):
                if y.requires_grad:
                    torch.autograd.backward(y, grad_y)
            grad_x = x.grad if x.grad is not None else torch.zeros_like(x)
            dispatches.append(
                AsyncAllToAll(
                    grad_x[plan.to_source_major[j]],
                    plan.send[j],
                    plan.recv[j],
                    comm,
                    f"{name}.dispatch",
                    "bwd",
                    j,
                    schema.DISPATCH,
                    layer,
                )
            )
        grad_rows = grad_out.new_empty(grad_out.shape)
        for j in range(plan.m):
            grad_rows[plan.send_rows[j]] = dispatches[j].wait()
        ctx.inputs = ctx.outputs = None
        return grad_rows, None, None, None, None, None, None

"""MoELayer = router + dispatcher (permute, all-to-all dispatch, experts, all-to-all combine,
unpermute) + local experts (+ shared experts). Works in one process and over any expert-parallel
group."""

from __future__ import annotations

import torch
from torch import nn

from lina.moe.alltoall import AllToAll, exchange_counts
from lina.moe.comm_context import ExpertComm
from lina.moe.experts import LocalExperts
from lina.moe.permute import inverse_permutation, permute_order, source_to_expert_major, unpermute
from lina.moe.pipeline import PipelinedExchange
from lina.moe.router import Routing, TopKRouter
from lina.moe.shared import SharedExperts
from lina.moe.spec import MoESpec
from lina.obs import schema


class MoELayer(nn.Module):
    """A Mixture-of-Experts FFN.

    Args:
        d_model, d_ff: widths of each expert FFN.
        num_experts: E (all ranks together); must be divisible by the EP group size.
        top_k, capacity_factor, dropless, balance_loss_weight, z_loss_weight, gate_noise: see
            :class:`lina.moe.router.TopKRouter`.
        comm: expert-parallel context; None means one process holding every expert.
        spec: router options, expert FFN kind and shared experts (:class:`lina.moe.spec.MoESpec`;
            the default is lina's own layer).
        init_experts: False leaves the local experts' weights uninitialised (about to be filled
            from a checkpoint) and draws nothing from the global RNG for them.

    ``forward(x: [..., d_model]) -> [..., d_model]``; the router's auxiliary loss of the last call
    is in ``self.aux_loss`` and its decision in ``self.last_routing``.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float = 1.25,
        dropless: bool = True,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        gate_noise: float = 0.0,
        comm: ExpertComm | None = None,
        spec: MoESpec | None = None,
        init_experts: bool = True,
    ):
        super().__init__()
        self.spec = spec or MoESpec()
        self.spec.validate(num_experts, top_k)
        self.comm = comm or ExpertComm()
        ep = self.comm.size
        if num_experts % ep:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel group size {ep}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_local = num_experts // ep
        first = self.comm.rank * self.num_local
        self.router = TopKRouter(
            d_model,
            num_experts,
            top_k,
            capacity_factor,
            dropless,
            balance_loss_weight,
            z_loss_weight,
            gate_noise,
            spec=self.spec.router,
        )
        self.experts = LocalExperts(
            self.num_local,
            d_model,
            d_ff,
            list(range(first, first + self.num_local)),
            init=init_experts,
            spec=self.spec.expert,
        )
        self.shared = SharedExperts(d_model, self.spec.shared) if self.spec.shared.d_ff > 0 else None
        self.aux_loss = torch.zeros(())
        self.last_routing: Routing | None = None
        self.layer_index = 0
        # device-time runs: replaces the gate's choices with a recorded trace's (lina.devicetime.routing)
        self.routing_source = None

    def set_experts(self, experts: LocalExperts) -> None:
        """Swap in the local experts of a new layout (expert packing). The caller has already
        pointed ``self.comm`` at the new EP group; ``experts`` must hold E / (EP size) experts,
        those of this rank's position in its group."""
        if experts.num_local * self.comm.size != self.num_experts:
            raise ValueError(
                f"{experts.num_local} local experts x EP size {self.comm.size} != {self.num_experts} experts"
            )
        self.experts = experts
        self.num_local = experts.num_local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        routing = self.router(tokens)
        if self.routing_source is not None:
            routing = self.routing_source.apply(self.layer_index, routing)
        self.aux_loss = routing.aux_loss
        self.last_routing = routing
        order, counts = permute_order(routing.expert_ids, routing.kept, self.num_experts)
        rows = tokens[order // self.top_k]
        out_rows = self._exchange(rows, counts)
        out = unpermute(out_rows, order, routing.weights, tokens.shape[0], self.top_k)
        if self.shared is not None:
            out = out + self.shared(tokens)
        if out.requires_grad and self.comm.group is not None:
            out.register_hook(self._backward_reaches_moe)
        return out.reshape(shape)

    def _backward_reaches_moe(self, grad: torch.Tensor) -> None:
        self.comm.on_backward_reaches_moe()

    def _exchange(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows: [S, d] grouped by global expert; counts: LongTensor[E]. Returns expert outputs
        for the same rows in the same order."""
        comm = self.comm
        name = f"moe{self.layer_index}"
        if comm.group is None:
            with comm.timeline.span(
                f"{name}.experts", "compute", kind=schema.EXPERT, layer=self.layer_index, phase="fwd"
            ):
                return self.experts(rows, counts.tolist())
        recv_counts = exchange_counts(counts, comm)  # [P, E_l]
        in_splits = counts.view(comm.size, -1).sum(1).tolist()
        if comm.pipeline_chunks > 1:
            step_experts = _StepExperts(self.experts)
            rows = _ExpertGradsOnce.apply(rows, step_experts, *self.experts.weights())
            return PipelinedExchange.apply(rows, in_splits, recv_counts, step_experts, comm, name, self.layer_index)
        out_splits = recv_counts.sum(1).tolist()
        received = AllToAll.apply(
            rows, out_splits, in_splits, comm, f"{name}.dispatch", schema.DISPATCH, self.layer_index
        )
        index = source_to_expert_major(recv_counts)
        grouped = received[index]
        with comm.timeline.span(f"{name}.experts", "compute", kind=schema.EXPERT, layer=self.layer_index, phase="fwd"):
            computed = self.experts(grouped, recv_counts.sum(0).tolist())
        back = computed[inverse_permutation(index)]
        return AllToAll.apply(back, in_splits, out_splits, comm, f"{name}.combine", schema.COMBINE, self.layer_index)


class _StepExperts:
    """The local experts with their weights as leaves of their own, for one pipelined exchange.

    The pipelined backward runs one small graph per micro-op, and each would accumulate into the
    expert parameters' ``.grad`` (firing their gradient hooks once per micro-op: a policy that
    allreduces a gradient from its hook would send a partial one). Here the micro-ops accumulate
    into these leaves instead, and :class:`_ExpertGradsOnce` hands the sum to autograd once, when
    the whole exchange's backward is done. Same additions in the same order: same numbers.
    """

    def __init__(self, experts: LocalExperts):
        self.experts = experts
        self.weights = [w.detach().requires_grad_() for w in experts.weights()]

    def __call__(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return self.experts(rows, counts, self.weights)


class _ExpertGradsOnce(torch.autograd.Function):
    """Identity on ``rows [S, d]`` placed before the pipelined exchange; its backward (which runs
    after the exchange's) returns the expert gradients collected by a :class:`_StepExperts`."""

    @staticmethod
    def forward(ctx, rows, step_experts: _StepExperts, *params):
        ctx.step_experts = step_experts
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad):
        grads = [w.grad for w in ctx.step_experts.weights]
        ctx.step_experts = None
        return (grad, None, *grads)

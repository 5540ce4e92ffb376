"""The local experts of one rank: E_l two-layer FFNs (GELU with biases, or SwiGLU without), computed
group by group: one matmul pair per expert over all its rows, never a loop over tokens, or one
grouped matrix multiply per weight over all experts (``torch.nn.functional.grouped_mm``) where the
device supports it.

Which experts a rank holds is a pure function of its rank and the EP size
(:func:`local_expert_ids`). Experts can be *offloaded*: their weights (and so their gradients and
optimizer state) live in host memory, and each expert's weights are brought in to the compute
device just before its FFN runs, again before its backward, and dropped after (the backward
recomputes the hidden activation instead of keeping device copies alive between the passes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lina.moe.spec import ExpertSpec

PARAM_NAMES = ("w1", "b1", "w2", "b2")  # GELU experts
SWIGLU_PARAM_NAMES = ("w1", "w2")  # SwiGLU experts: w1 = [gate | up]


def param_names(activation: str) -> tuple[str, ...]:
    """The parameters of experts with ``activation``, in the order :meth:`LocalExperts.weights` gives."""
    return SWIGLU_PARAM_NAMES if activation == "swiglu" else PARAM_NAMES


def local_expert_ids(rank: int, ep_size: int, num_experts: int) -> list[int]:
    """Global ids of the experts rank ``rank`` holds when EP groups are blocks of ``ep_size``
    consecutive ranks: position p = rank % ep_size holds ``[p*E_l, (p+1)*E_l)``, E_l = E / ep_size."""
    per_rank = num_experts // ep_size
    first = (rank % ep_size) * per_rank
    return list(range(first, first + per_rank))


@dataclass
class OffloadStats:
    """What bringing offloaded experts in cost on this rank (since the last reset)."""

    copies_in: int = 0  # expert weight sets brought to the compute device (forward and backward)
    bytes_in: int = 0


def bring_in(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy host-resident weights to the compute device. On a GPU this is an asynchronous
    host-to-device copy from pinned memory; where host and compute device are the same memory (CPU)
    it is still a real copy into a fresh buffer, so the code path and its accounting are the same."""
    if t.device == device:
        return t.clone()
    return t.to(device, non_blocking=True)


def _ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    return torch.addmm(b2, F.gelu(torch.addmm(b1, x, w1)), w2)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h: [S, 2f] = [x w_gate | x w_up] -> silu(x w_gate) * x w_up, [S, f]."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _swiglu_ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x [S, d], w1 [d, 2f], w2 [f, d] -> [S, d]."""
    return swiglu(x @ w1) @ w2


def expert_fn(activation: str):
    """The one-expert FFN ``fn(x [S, d], *weights) -> [S, d]`` of ``activation``."""
    return _swiglu_ffn if activation == "swiglu" else _ffn


_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` runs on this device and dtype (probed once with
    a tiny product, forward and backward; False where torch lacks it)."""
    key = (str(device), dtype)
    if key not in _GROUPED_OK:
        fn = getattr(F, "grouped_mm", None)
        ok = fn is not None
        if ok:
            try:
                a = torch.randn(8, 16, device=device, dtype=dtype, requires_grad=True)
                b = torch.randn(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
                y = fn(a, b, offs=torch.tensor([3, 8], device=device, dtype=torch.int32))
                y.backward(torch.ones_like(y))
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED_OK[key] = ok
    return _GROUPED_OK[key]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward
    rejects expanded gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_swiglu(rows: torch.Tensor, counts: list[int], w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """All local SwiGLU experts with two grouped matrix multiplies.

    rows: [S, d] grouped by expert; counts: rows per expert (len E_l); w1: [E_l, d, 2f];
    w2: [E_l, f, d] -> [S, d]."""
    offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(device=rows.device, dtype=torch.int32)
    h = F.grouped_mm(rows.contiguous(), w1, offs=offs)
    y = F.grouped_mm(swiglu(_ContiguousGrad.apply(h)).contiguous(), w2, offs=offs)
    return _ContiguousGrad.apply(y)


class _HostExpertFFN(torch.autograd.Function):
    """One offloaded expert: ``x [S, d_model] -> [S, d_model]`` with host-resident weights (GELU:
    ``w1 [d_model, d_ff]``, ``b1 [d_ff]``, ``w2 [d_ff, d_model]``, ``b2 [d_model]``; SwiGLU:
    ``w1 [d_model, 2 d_ff]``, ``w2 [d_ff, d_model]``). Weights are brought in for forward and
    again for backward; gradients go back to the host weights."""

    @staticmethod
    def forward(ctx, x, fn, stats: OffloadStats, *host):
        weights = [bring_in(w, x.device) for w in host]
        stats.copies_in += 1
        stats.bytes_in += sum(w.numel() * w.element_size() for w in weights)
        ctx.save_for_backward(x, *host)
        ctx.stats = stats
        ctx.fn = fn
        return fn(x, *weights)

    @staticmethod
    def backward(ctx, grad_y):
        x, *host = ctx.saved_tensors
        with torch.enable_grad():
            x_in = x.detach().requires_grad_()
            weights = [bring_in(w, x.device).requires_grad_() for w in host]
            ctx.stats.copies_in += 1
            ctx.stats.bytes_in += sum(w.numel() * w.element_size() for w in weights)
            y = ctx.fn(x_in, *weights)
            grads = torch.autograd.grad(y, [x_in, *weights], grad_y)
        return (grads[0], None, None, *(g.to(h.device) for g, h in zip(grads[1:], host)))


class LocalExperts(nn.Module):
    """E_l expert FFNs ``d_model -> d_ff -> d_model`` with GELU (default) or SwiGLU (``spec``).

    GELU parameters (``w1 [E_l, d_model, d_ff]``, ``b1 [E_l, d_ff]``, ``w2 [E_l, d_ff, d_model]``,
    ``b2 [E_l, d_model]``); SwiGLU parameters (``w1 [E_l, d_model, 2 d_ff]``, gate columns then
    up columns, ``w2 [E_l, d_ff, d_model]``).
    They are marked ``param.lina_expert = True`` so that data-parallel gradient
    sync of non-expert parameters skips them. ``global_ids`` are the experts' ids in the whole model.
    ``init=False`` leaves the weights uninitialised (they are about to be filled, e.g. by
    :meth:`from_tensors`) and draws nothing from the global RNG.
    """

    def __init__(
        self,
        num_local: int,
        d_model: int,
        d_ff: int,
        global_ids: list[int],
        init: bool = True,
        spec: ExpertSpec | None = None,
    ):
        super().__init__()
        self.spec = spec or ExpertSpec()
        self.spec.validate()
        self.num_local = num_local
        self.global_ids = list(global_ids)
        self.param_names = param_names(self.spec.activation)
        self._fn = expert_fn(self.spec.activation)
        if self.spec.activation == "swiglu":
            self.w1 = nn.Parameter(torch.empty(num_local, d_model, 2 * d_ff))
            self.w2 = nn.Parameter(torch.empty(num_local, d_ff, d_model))
        else:
            self.w1 = nn.Parameter(torch.empty(num_local, d_model, d_ff))
            self.b1 = nn.Parameter(torch.zeros(num_local, d_ff))
            self.w2 = nn.Parameter(torch.empty(num_local, d_ff, d_model))
            self.b2 = nn.Parameter(torch.zeros(num_local, d_model))
        for p in self.parameters():
            p.lina_expert = True
        self.offloaded = False
        self.offload_stats = OffloadStats()
        if init:
            self.reset_parameters()

    @classmethod
    def from_tensors(
        cls, global_ids: list[int], *weights: torch.Tensor, spec: ExpertSpec | None = None
    ) -> "LocalExperts":
        """Experts with the given weights, in :func:`param_names` order of ``spec.activation``
        (shapes as in the class docstring, E_l = len(global_ids))."""
        spec = spec or ExpertSpec()
        names = param_names(spec.activation)
        if len(weights) != len(names):
            raise ValueError(
                f"{spec.activation} experts take {len(names)} tensors ({', '.join(names)}), got {len(weights)}"
            )
        num_local, d_model = weights[0].shape[:2]
        d_ff = weights[-2 if spec.activation == "gelu" else -1].shape[1]
        experts = cls(num_local, d_model, d_ff, global_ids, init=False, spec=spec)
        with torch.no_grad():
            for name, t in zip(names, weights):
                expected = tuple(getattr(experts, name).shape)
                if expected != tuple(t.shape):
                    raise ValueError(f"expert weight {name}: shape {tuple(t.shape)}, expected {expected}")
                getattr(experts, name).copy_(t)
        return experts

    def reset_parameters(self) -> None:
        """Each expert's weights come from its own generator seeded by (layer seed, global id), so
        expert e starts the same wherever it is placed; the layer seed is drawn from the global RNG
        the same way on every rank, so non-expert initialisation is identical on all ranks."""
        layer_seed = int(torch.randint(2**31 - 1, ()))
        d_model, d_ff = self.w1.shape[1], self.w2.shape[1]
        with torch.no_grad():
            for i, e in enumerate(self.global_ids):
                gen = torch.Generator().manual_seed(layer_seed * 1009 + e)
                self.w1[i].copy_(torch.randn(self.w1.shape[1:], generator=gen) / math.sqrt(d_model))
                self.w2[i].copy_(torch.randn(d_ff, d_model, generator=gen) / math.sqrt(d_ff))
        if self.spec.activation == "gelu":
            nn.init.zeros_(self.b1)
            nn.init.zeros_(self.b2)

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def training_bytes(self) -> int:
        """Memory these experts take in training: weights, gradients and AdamW's two moments."""
        return 4 * self.weight_bytes()

    def set_offloaded(self, offloaded: bool, device: torch.device) -> None:
        """Keep the weights in host memory (``offloaded``) or on ``device``, the compute device.

        On a GPU, offloaded weights move to pinned host memory; the caller moves the optimizer
        state of these parameters along (see :meth:`lina.train.trainer.Trainer.place_experts`).
        On CPU host and device are the same memory and nothing moves; only the compute path and
        its accounting change.
        """
        home = torch.device("cpu") if offloaded else device
        for p in self.parameters():
            if p.device != home:
                data = p.data.to(home)
                p.data = data.pin_memory() if offloaded and device.type == "cuda" else data
        self.offloaded = offloaded

    def weights(self) -> list[torch.Tensor]:
        """The parameters in :attr:`param_names` order."""
        return [getattr(self, n) for n in self.param_names]

    def uses_grouped_mm(self, rows: torch.Tensor) -> bool:
        """Whether :meth:`forward` computes ``rows`` with grouped matrix multiplies."""
        return (
            self.spec.grouped_mm
            and self.spec.activation == "swiglu"
            and not self.offloaded
            and rows.shape[0] > 0
            and grouped_mm_supported(rows.device, rows.dtype)
        )

    def forward(self, rows: torch.Tensor, counts: list[int], weights: list[torch.Tensor] | None = None) -> torch.Tensor:
        """rows: FloatTensor[S, d_model] grouped by local expert; counts: rows per local expert
        (len E_l, sums to S) -> FloatTensor[S, d_model]. ``weights`` (shapes of the parameters)
        replace the parameters, e.g. by leaves that collect one step's gradients."""
        weights = weights if weights is not None else self.weights()
        if self.uses_grouped_mm(rows):
            return grouped_swiglu(rows, counts, *weights)
        outs = []
        # One view per expert from a single unbind: its backward stacks the experts' gradients into
        # one tensor, where indexing w[e] per expert would add E full-size zero-padded gradients.
        per_expert = list(zip(*(w.unbind(0) for w in weights))) if not self.offloaded else None
        for e, chunk in enumerate(torch.split(rows, counts)):
            if not self.offloaded:
                if self.spec.activation == "gelu":
                    w1, b1, w2, b2 = per_expert[e]
                    h = F.gelu(torch.addmm(b1, chunk, w1))
                    outs.append(torch.addmm(b2, h, w2))
                else:
                    outs.append(_swiglu_ffn(chunk, *per_expert[e]))
            elif chunk.shape[0]:  # an offloaded expert without rows is not brought in
                outs.append(_HostExpertFFN.apply(chunk, self._fn, self.offload_stats, *(w[e] for w in weights)))
        if not outs:
            return rows
        return torch.cat(outs) if len(outs) > 1 else outs[0]

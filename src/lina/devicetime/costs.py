"""FLOPs and memory bytes of one aten op, from the shapes of its inputs and outputs.

Matrix products and attention are costed by their FLOPs; every other op by the bytes it reads
and writes. Floating-point elements count ``float_bytes`` each (2: the bf16 of a mixed-precision
run on the device, whatever dtype this machine holds them in).
"""

from __future__ import annotations

import math

import torch

#: aten ops costed by FLOPs (packet names)
MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "_grouped_mm"}


def _nbytes(t: torch.Tensor, float_bytes: int) -> int:
    size = float_bytes if t.is_floating_point() else t.element_size()
    return t.numel() * size


def tensors_of(tree) -> list[torch.Tensor]:
    """Every tensor in nested args (lists, tuples, dicts)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for x in tree for t in tensors_of(x)]
    if isinstance(tree, dict):
        return [t for x in tree.values() for t in tensors_of(x)]
    return []


def matmul_flops(name: str, args: tuple) -> float:
    """2 * M * K * N (per batch) of a matrix-product op; its positional ``args`` are the op's.

    ``mm(a [M,K], b [K,N])``, ``addmm(c, a, b)``, ``bmm(a [B,M,K], b [B,K,N])``,
    ``baddbmm(c, a, b)``, ``addbmm(c, a [B,M,K], b [B,K,N])``, ``_grouped_mm(a [T,K], b [G,K,N], offs)``.
    """
    if name == "mm":
        a, b = args[0], args[1]
    elif name in ("addmm", "baddbmm", "addbmm"):
        a, b = args[1], args[2]
    else:
        a, b = args[0], args[1]
    if name == "_grouped_mm":
        return 2.0 * a.shape[0] * a.shape[-1] * b.shape[-1]
    batch = math.prod(a.shape[:-2]) if a.dim() > 2 else 1
    return 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


def attention_flops(name: str, args: tuple) -> float:
    """Scaled dot-product attention ``q [B,H,L,D], k [B,H,S,D]``: 4*B*H*L*S*D forward (QK^T and
    PV), twice that for a backward op."""
    q, k = args[0], args[1]
    if "backward" in name:  # grad_out comes first in the backward ops
        q, k = args[1], args[2]
    b_h = math.prod(q.shape[:-2])
    flops = 4.0 * b_h * q.shape[-2] * k.shape[-2] * q.shape[-1]
    return 2.0 * flops if "backward" in name else flops


def op_cost(name: str, args: tuple, kwargs: dict, outputs, float_bytes: int = 2) -> tuple[float, float]:
    """``(flops, bytes)`` of aten op ``name`` (its overload packet's name) called with ``args`` /
    ``kwargs`` and giving ``outputs`` (tensors with the outputs' shapes; meta tensors do)."""
    moved = sum(_nbytes(t, float_bytes) for t in tensors_of((args, kwargs)) + tensors_of(outputs))
    if name in MATMUL_OPS:
        return matmul_flops(name, args), float(moved)
    if "scaled_dot_product" in name:
        return attention_flops(name, args), float(moved)
    return 0.0, float(moved)

"""Pure index functions: order token-slots by expert, regroup received rows, and scatter back."""

from __future__ import annotations

import torch


def permute_order(expert_ids: torch.Tensor, kept: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the kept token-slots by expert (stable, so tokens keep their order inside an expert).

    Args:
        expert_ids: LongTensor[T, k]; kept: BoolTensor[T, k].
    Returns:
        order: LongTensor[S], flat slot indices ``t * k + j`` of the S kept slots, expert-major;
        counts: LongTensor[E], slots per expert (sums to S).
    """
    flat = expert_ids.reshape(-1)
    slots = torch.nonzero(kept.reshape(-1), as_tuple=True)[0]
    experts = flat[slots]
    order = slots[torch.argsort(experts, stable=True)]
    counts = torch.bincount(experts, minlength=num_experts)
    return order, counts


def source_to_expert_major(counts: torch.Tensor) -> torch.Tensor:
    """Index that reorders received rows from (source rank, local expert) to (local expert, source).

    Args:
        counts: LongTensor[P, E_l], rows received from source p for local expert e.
    Returns:
        LongTensor[S]: ``rows[idx]`` is expert-major; its inverse permutation undoes it.
    """
    p, el = counts.shape
    flat = counts.reshape(-1)
    starts = (torch.cumsum(flat, 0) - flat).view(p, el)
    counts_em = counts.t().reshape(-1)  # blocks in expert-major order
    starts_em = starts.t().reshape(-1)
    total = int(counts_em.sum())
    dev = counts.device
    block_of_row = torch.repeat_interleave(torch.arange(counts_em.numel(), device=dev), counts_em)
    offset_in_block = torch.arange(total, device=dev) - (torch.cumsum(counts_em, 0) - counts_em)[block_of_row]
    return starts_em[block_of_row] + offset_in_block


def inverse_permutation(index: torch.Tensor) -> torch.Tensor:
    """LongTensor[S] -> LongTensor[S] with ``inv[index[i]] = i``."""
    inv = torch.empty_like(index)
    inv[index] = torch.arange(index.numel(), device=index.device)
    return inv


def unpermute(
    rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, num_tokens: int, top_k: int
) -> torch.Tensor:
    """Weight expert outputs by their gate scores and add them back onto their tokens.

    Args:
        rows: FloatTensor[S, d], expert outputs in ``order``.
        order: LongTensor[S] flat slot indices (see :func:`permute_order`).
        weights: FloatTensor[T, k] gate weights.
    Returns:
        FloatTensor[T, d].
    """
    w = weights.reshape(-1)[order].unsqueeze(-1).to(rows.dtype)
    out = rows.new_zeros((num_tokens, rows.shape[-1]))
    return out.index_add(0, order // top_k, rows * w)

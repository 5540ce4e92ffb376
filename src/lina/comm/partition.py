"""Tensor partitioning into communication micro-ops (Lina, "Training", step 1 and 3).

Gradients: every gradient tensor is split on its own into equal chunks of ``chunk_bytes``
(the last one shorter); chunks of different tensors are never mixed (no DDP-style fusion),
so each chunk is one allreduce micro-op.

All-to-all: the tokens a rank sends to each peer are split along the token dimension into
``m`` contiguous, near-equal pieces; micro-op ``j`` carries piece ``j`` of every peer.

Reassembly is free when the chunks are views of the gradient: a contiguous tensor is split
with :meth:`torch.Tensor.split` on its flat view, so an in-place ``all_reduce`` on each
chunk writes straight into the gradient's storage and nothing has to be concatenated.
Only a non-contiguous tensor needs a copy (into one flat buffer), and then
:func:`reassemble` copies the reduced buffer back.

Everything here is a pure function of tensor shapes; nothing communicates.
"""

from __future__ import annotations

from typing import Iterable

import torch

from lina.errors import ConfigError


def chunk_numel(element_size: int, chunk_bytes: int) -> int:
    """Elements per chunk: ``chunk_bytes // element_size`` (a chunk never splits an element).

    Raises:
        ConfigError: ``chunk_bytes`` is smaller than one element.
    """
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int):
        raise ConfigError(
            "chunk_bytes", f"{chunk_bytes!r} is not an integer", "give the chunk size in bytes, e.g. 30 * 2**20"
        )
    if chunk_bytes < element_size:
        raise ConfigError(
            "chunk_bytes",
            f"{chunk_bytes} bytes is smaller than one element ({element_size} bytes)",
            f"use a chunk size of at least {element_size} bytes (Lina used 30 MiB)",
        )
    return chunk_bytes // element_size


def chunk_count(numel: int, element_size: int, chunk_bytes: int) -> int:
    """Number of micro-ops for a tensor of ``numel`` elements (0 for an empty tensor)."""
    per = chunk_numel(element_size, chunk_bytes)
    return -(-numel // per)


def chunk_counts(params: Iterable[torch.Tensor], chunk_bytes: int) -> list[int]:
    """Micro-ops per parameter (or gradient) tensor, in the order given.

    Args:
        params: tensors of any shape and dtype; only ``numel()`` and ``element_size()`` are read.
        chunk_bytes: micro-op size in bytes.

    Returns:
        ``counts[i] = ceil(params[i].numel() / (chunk_bytes // params[i].element_size()))``.
    """
    return [chunk_count(p.numel(), p.element_size(), chunk_bytes) for p in params]


def partition(tensor: torch.Tensor, chunk_bytes: int) -> list[torch.Tensor]:
    """Split one tensor into flat chunks of ``chunk_bytes`` (the last one may be shorter).

    Args:
        tensor: any shape ``[*]``, any dtype and device.
        chunk_bytes: micro-op size in bytes; each chunk holds ``chunk_bytes // element_size``
            elements.

    Returns:
        1-D tensors ``[n_0], [n_1], ...`` covering ``tensor`` in row-major order, with
        ``sum(n_i) == tensor.numel()``; ``[]`` for an empty tensor. For a contiguous tensor
        they are views of its storage (no copy; writing into a chunk writes into
        ``tensor``). For a non-contiguous tensor they are views of one new flat copy; call
        :func:`reassemble` after reducing them in place.
    """
    per = chunk_numel(tensor.element_size(), chunk_bytes)
    if tensor.numel() == 0:
        return []
    flat = tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1).clone()
    return list(flat.split(per))


def is_view_of(chunks: list[torch.Tensor], tensor: torch.Tensor) -> bool:
    """True when ``chunks`` are consecutive views of ``tensor``'s own memory (reassembly free)."""
    if not chunks or not tensor.is_contiguous():
        return not chunks and tensor.numel() == 0
    ptr = tensor.data_ptr()
    step = tensor.element_size()
    for chunk in chunks:
        if chunk.data_ptr() != ptr or not chunk.is_contiguous():
            return False
        ptr += chunk.numel() * step
    return ptr == tensor.data_ptr() + tensor.numel() * step


def reassemble(chunks: list[torch.Tensor], into: torch.Tensor) -> torch.Tensor:
    """Put reduced chunks back into ``into`` (shape ``[*]``) and return it.

    Free (nothing copied) when the chunks are views of ``into`` as :func:`partition`
    returns for a contiguous tensor; otherwise one ``copy_`` of the concatenation.

    Raises:
        ConfigError: the chunks do not hold exactly ``into.numel()`` elements.
    """
    total = sum(c.numel() for c in chunks)
    if total != into.numel():
        raise ConfigError(
            "chunks",
            f"they hold {total} elements but the tensor has {into.numel()}",
            "reassemble the chunks that partition() returned for this very tensor",
        )
    if is_view_of(chunks, into):
        return into
    flat = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    into.copy_(flat.view(into.shape))
    return into


def split_a2a(send_splits: list[int], m: int) -> list[list[int]]:
    """Per-micro-op send splits of an all-to-all cut along the token dimension.

    Peer ``p``'s ``send_splits[p]`` tokens are cut into ``m`` contiguous pieces of sizes
    ``c // m + (1 if j < c % m else 0)`` (near-equal, larger first); a peer with zero
    tokens gets zeros. The same rule applied to the receive splits gives the matching
    receive splits of every micro-op, because each sender cuts its own count the same way.
    Every rank must use the same ``m`` (it is a collective's count of calls).

    Args:
        send_splits: tokens for each peer, length ``world``; non-negative ints.
        m: number of micro-ops, at least 1.

    Returns:
        ``out[j][p]`` = tokens for peer ``p`` in micro-op ``j``; ``m`` lists of length
        ``world``, and ``sum_j out[j][p] == send_splits[p]``.
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigError("m", f"{m!r} is not a positive integer", "split an all-to-all into at least 1 micro-op")
    for p, c in enumerate(send_splits):
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ConfigError("send_splits", f"entry {p} is {c!r}", "give a non-negative token count per peer")
    return [[c // m + (1 if j < c % m else 0) for c in send_splits] for j in range(m)]


def a2a_micro_rows(send_splits: list[int], m: int) -> list[torch.Tensor]:
    """Rows of the send buffer that each all-to-all micro-op carries.

    The send buffer holds peer 0's tokens, then peer 1's, ... (``send_splits`` rows each).
    Micro-op ``j`` gathers, in peer order, piece ``j`` of every peer's range as cut by
    :func:`split_a2a`, so ``send[rows[j]]`` is its input with splits ``split_a2a(...)[j]``.

    Returns:
        ``m`` int64 tensors ``[sum_p split_a2a(send_splits, m)[j][p]]``; together they hold
        every row ``0 .. sum(send_splits) - 1`` exactly once.
    """
    pieces = split_a2a(send_splits, m)
    starts = [0]
    for c in send_splits:
        starts.append(starts[-1] + c)
    offset = list(starts[:-1])
    out = []
    for j in range(m):
        ranges = []
        for p, n in enumerate(pieces[j]):
            if n:
                ranges.append(torch.arange(offset[p], offset[p] + n, dtype=torch.int64))
                offset[p] += n
        out.append(torch.cat(ranges) if ranges else torch.empty(0, dtype=torch.int64))
    return out

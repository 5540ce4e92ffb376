"""Choosing the next token from logits: greedy, or sampled with a per-request generator."""

from __future__ import annotations

import torch


def next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """logits FloatTensor[vocab] -> token id; ``temperature`` 0 is greedy (argmax)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def request_generator(seed: int, index: int) -> torch.Generator:
    """The sampling generator of request ``index``: the same whichever rank serves it."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)

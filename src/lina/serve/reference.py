"""The single-process reference of ``lina generate``: the plain model, the whole sequence
recomputed for every new token (no cache, no engine). Served outputs must equal it."""

from __future__ import annotations

import torch

from lina.models.gpt import MoEGPT
from lina.serve.sampling import next_token


@torch.no_grad()
def reference_generate(
    model: MoEGPT,
    tokens: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The new tokens after ``tokens`` (greedy at temperature 0, else sampled with ``generator``)."""
    model.eval()
    seq = list(tokens)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([seq]))[0, -1]
        seq.append(next_token(logits, temperature, generator))
    return seq[len(tokens) :]

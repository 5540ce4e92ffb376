"""Generation on N expert-parallel workers: each serves its own requests (attention is
data-parallel) while every MoE layer runs through the :class:`InferenceEngine` over all of them.

A step is one engine batch: first the prefill of every local prompt at once, then one decode
token per unfinished local request. Ranks stay in lockstep: before each decode step one tiny
allreduce says whether any rank still has work, and a rank with nothing left (or nothing at all)
takes part with zero tokens, so no collective is ever left waiting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from lina.infer.engine import InferenceEngine
from lina.serve.cached_gpt import CachedGPT
from lina.serve.cached_hf import CachedHF
from lina.serve.requests import Request, decode
from lina.serve.sampling import next_token, request_generator


@dataclass
class Generation:
    """One request's result: generated ``tokens`` and ``text``, time to first token and the
    latency of each later token (seconds)."""

    id: str
    prompt: str
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    ttft_s: float = 0.0
    token_latencies_s: list[float] = field(default_factory=list)
    index: int = 0

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "text": self.text,
            "tokens": self.tokens,
            "ttft_s": self.ttft_s,
            "token_latencies_s": self.token_latencies_s,
        }


@dataclass
class ServeStats:
    """This rank's steps: how many, and the engine's per-step latency (prefill first)."""

    steps: int = 0
    step_latencies_s: list[float] = field(default_factory=list)


def _any_left(active: int, group: dist.ProcessGroup | None) -> bool:
    flag = torch.tensor([active], dtype=torch.long)
    if group is not None:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


@torch.no_grad()
def generate(
    served: CachedGPT | CachedHF,
    engine: InferenceEngine,
    requests: list[Request],
    temperature: float = 0.0,
    seed: int = 0,
    progress=None,
    decode_text: Callable[[list[int]], str] = decode,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[list[Generation], ServeStats]:
    """Serve this rank's ``requests`` to the end (a collective over the engine's group: every rank
    calls it, with its own share, possibly none).

    Args:
        temperature: 0 for greedy; above, sampling with a per-request generator (same tokens on
            whichever rank serves the request).
        progress: called with a one-line status after each step (rank 0 prints it).
        decode_text: token ids -> text (lina's byte tokens by default; a checkpoint's tokenizer).
        on_step: called after each step with the gates' choices of this rank's tokens,
            ``expert_ids`` LongTensor[T, L, k] and ``weights`` FloatTensor[T, L, k] (T may be 0).
    """
    out = {r.index: Generation(r.id, r.prompt, index=r.index) for r in requests}
    gens = {r.index: request_generator(seed, r.index) for r in requests} if temperature > 0 else {}
    stats = ServeStats()
    start = time.perf_counter()
    pieces = [(r.index, r.tokens, 0) for r in requests]  # prefill: every local prompt at once
    active = list(requests)
    while True:
        step_start = time.perf_counter()
        h, _ = engine.run_batch(served.begin(pieces), served.dense, served.gate)
        logits = served.last_logits(h)
        now = time.perf_counter()
        stats.steps += 1
        stats.step_latencies_s.append(now - step_start)
        if on_step is not None:
            on_step(
                torch.stack([r.expert_ids for r in engine.layer_routing], dim=1),
                torch.stack([r.weights for r in engine.layer_routing], dim=1),
            )
        for r in active:
            g = out[r.index]
            g.tokens.append(next_token(logits[r.index], temperature, gens.get(r.index)))
            if len(g.tokens) == 1:
                g.ttft_s = now - start
            else:
                g.token_latencies_s.append(now - step_start)
        for r in [r for r in active if len(out[r.index].tokens) >= r.max_new_tokens]:
            served.forget(r.index)
        active = [r for r in active if len(out[r.index].tokens) < r.max_new_tokens]
        if progress is not None:
            progress(stats.steps, len(active))
        if not _any_left(len(active), engine.group):
            break
        pieces = [(r.index, [out[r.index].tokens[-1]], len(r.tokens) + len(out[r.index].tokens) - 1) for r in active]
    for g in out.values():
        g.text = decode_text(g.tokens)
    return list(out.values()), stats

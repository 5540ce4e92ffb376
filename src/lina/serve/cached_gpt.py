"""The project's GPT split for serving: embedding, each block's attention (with a KV cache per
request) as the engine's ``dense``, its router as ``gate``, its experts as the engine's store,
and the head. Tokens of several requests travel as one flat batch ``[T, d]``; ``segments`` say
which rows belong to which request."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lina.infer.model_adapter import ServedGPT
from lina.models.gpt import MoEGPT


@dataclass
class Segment:
    """Rows ``[start, start + length)`` of the flat batch are request ``key``'s tokens at
    positions ``[position, position + length)``."""

    key: int
    start: int
    length: int
    position: int


class CachedGPT(ServedGPT):
    """:class:`ServedGPT` with per-request key/value caches, for prefill and decode."""

    def __init__(self, model: MoEGPT):
        super().__init__(model)
        self.cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (request, layer) -> K, V [H, P, dh]
        self.segments: list[Segment] = []

    def begin(self, pieces: list[tuple[int, list[int], int]]) -> torch.Tensor:
        """Start a batch: ``pieces`` of (request key, tokens, first position). Returns the
        embedded rows FloatTensor[T, d] (T may be 0)."""
        self.segments, rows, start = [], [], 0
        for key, tokens, position in pieces:
            idx = torch.tensor(tokens, dtype=torch.long)
            pos = torch.arange(position, position + len(tokens))
            rows.append(self.model.tok_emb(idx) + self.model.pos_emb(pos))
            self.segments.append(Segment(key, start, len(tokens), position))
            start += len(tokens)
        d = self.model.cfg.d_model
        return torch.cat(rows) if rows else torch.zeros(0, d)

    def dense(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, d] -> (h + attention, the MoE input ln2(h + attention)), each [T, d]."""
        block = self.model.blocks[layer]
        if h.shape[0] == 0:
            return h, h
        attn = torch.cat(
            [self._attend(layer, block.attn, block.ln1(h[s.start : s.start + s.length]), s) for s in self.segments]
        )
        x = h + attn
        return x, block.ln2(x)

    def _attend(self, layer: int, attn, x: torch.Tensor, seg: Segment) -> torch.Tensor:
        """One request's new rows x [n, d] attend to its cache and themselves (causally)."""
        n, d = x.shape
        heads = attn.n_heads
        q, k, v = attn.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(n, heads, d // heads).transpose(0, 1) for t in (q, k, v))  # [H, n, dh]
        past = self.cache.get((seg.key, layer))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
        self.cache[(seg.key, layer)] = (k, v)
        if past is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            total = k.shape[1]
            mask = torch.arange(total).unsqueeze(0) <= (torch.arange(n) + total - n).unsqueeze(1)  # [n, total]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn.proj(y.transpose(0, 1).reshape(n, d))

    def last_logits(self, h: torch.Tensor) -> dict[int, torch.Tensor]:
        """Logits FloatTensor[vocab] at each segment's last row, by request key."""
        return {s.key: self.model.head(self.model.ln_f(h[s.start + s.length - 1])) for s in self.segments}

    def forget(self, key: int) -> None:
        """Drop a finished request's caches."""
        for layer in range(len(self.model.blocks)):
            self.cache.pop((key, layer), None)

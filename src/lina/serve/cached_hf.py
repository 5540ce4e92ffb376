"""A Hugging Face MoE checkpoint split for serving, like :class:`lina.serve.cached_gpt.CachedGPT`:
the decoder layers' attention (with the model's own ``DynamicCache`` per request, its rotary
embeddings and its causal masks) as the engine's ``dense``, each MoE block's lina router as
``gate``, its routed experts as the engine's :class:`ExpertStore`, and the final norm and head.

Decoder layers without an MoE block (DeepSeek-V3's first dense layers, Qwen2-MoE's
``mlp_only_layers``) run whole inside the ``dense`` of the next MoE layer, or before the head when
they come last. Tokens of several requests travel as one flat batch ``[T, d]``; each request's
rows attend only to its own cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lina.hf.swap import ExpertParallel
from lina.infer.engine import LayerRouting
from lina.infer.store import ExpertStore


@dataclass
class HFSegment:
    """Rows ``[start, start + length)`` of the flat batch: request ``key``'s tokens at positions
    ``position_ids`` LongTensor[1, length], with their rotary embeddings and masks (by layer type)."""

    key: int
    start: int
    length: int
    position_ids: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor]
    masks: dict[str, torch.Tensor | None]


class CachedHF:
    """A transformers MoE model whose sparse blocks were swapped for lina layers holding every
    expert (:func:`lina.hf.checkpoint.load_pretrained` with no group), served with a KV cache.

    Attributes:
        store: routed experts of every MoE layer, w1 [L, E, d, 2f] and w2 [L, E, f, d].
        context: the checkpoint's positions (prompt + new tokens must fit).
    """

    def __init__(self, handle: ExpertParallel):
        self.handle = handle
        self.hf = handle.model.eval()
        self.config = self.hf.config
        self.decoder = self.hf.model
        self.moe_layers = list(handle.layers)
        self.moe_ids = list(handle.layer_ids)  # decoder index of each MoE layer
        self.store = ExpertStore(
            torch.stack([m.experts.w1.detach() for m in self.moe_layers]),
            None,
            torch.stack([m.experts.w2.detach() for m in self.moe_layers]),
            None,
        )
        self.context = int(self.config.max_position_embeddings)
        self.num_experts = self.moe_layers[0].num_experts
        self.top_k = self.moe_layers[0].top_k
        self.cache: dict[int, object] = {}  # request key -> DynamicCache
        self.segments: list[HFSegment] = []
        self._next_decoder = 0

    # ------------------------------------------------------------------ masks and caches
    def _layer_type(self, i: int) -> str:
        types = getattr(self.config, "layer_types", None)
        if types:
            return types[i]
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"

    def _masks(self, emb: torch.Tensor, cache, position_ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kwargs = dict(
            config=self.config, inputs_embeds=emb, attention_mask=None, cache=cache, position_ids=position_ids
        )
        kinds = {self._layer_type(i) for i in range(len(self.decoder.layers))}
        masks = {}
        if "full_attention" in kinds:
            masks["full_attention"] = create_causal_mask(**kwargs)
        if "sliding_attention" in kinds:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def begin(self, pieces: list[tuple[int, list[int], int]]) -> torch.Tensor:
        """Start a batch: ``pieces`` of (request key, tokens, first position). Returns the
        embedded rows FloatTensor[T, d] (T may be 0)."""
        from transformers import DynamicCache

        self.segments, rows, start = [], [], 0
        for key, tokens, position in pieces:
            emb = self.decoder.embed_tokens(torch.tensor([tokens], dtype=torch.long))  # [1, n, d]
            cache = self.cache.setdefault(key, DynamicCache(config=self.config))
            position_ids = torch.arange(position, position + len(tokens)).unsqueeze(0)
            rotary = self.decoder.rotary_emb(emb, position_ids)
            masks = self._masks(emb, cache, position_ids)
            self.segments.append(HFSegment(key, start, len(tokens), position_ids, rotary, masks))
            rows.append(emb[0])
            start += len(tokens)
        self._next_decoder = 0
        d = self.config.hidden_size
        return torch.cat(rows) if rows else torch.zeros(0, d, dtype=self.decoder.embed_tokens.weight.dtype)

    # ------------------------------------------------------------------ per-request pieces
    def _per_segment(self, h: torch.Tensor, fn) -> torch.Tensor:
        """Apply ``fn(segment, rows [1, n, d]) -> [1, n, d]`` to each request's rows of h [T, d]."""
        return torch.cat([fn(s, h[s.start : s.start + s.length].unsqueeze(0))[0] for s in self.segments])

    def _attention(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Decoder layer i's attention of h [T, d] (normed first), each request on its own cache."""
        layer = self.decoder.layers[i]

        def attend(s: HFSegment, x: torch.Tensor) -> torch.Tensor:
            out, _ = layer.self_attn(
                hidden_states=layer.input_layernorm(x),
                position_embeddings=s.rotary,
                attention_mask=s.masks[self._layer_type(i)],
                position_ids=s.position_ids,
                cache=self.cache[s.key],
                use_cache=True,
            )
            return out

        return self._per_segment(h, attend)

    def _whole_layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """A decoder layer without an MoE block (dense MLP), whole: h [T, d] -> [T, d]."""
        layer = self.decoder.layers[i]
        x = h + self._attention(i, h)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    # ------------------------------------------------------------------ the engine's callables
    def dense(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MoE layer ``layer``'s non-expert part: h [T, d] -> (residual with attention and the
        shared experts, the MoE input post_attention_layernorm(h + attention)), each [T, d]."""
        target = self.moe_ids[layer]
        if h.shape[0] == 0:
            self._next_decoder = target + 1
            return h, h
        for i in range(self._next_decoder, target):
            h = self._whole_layer(i, h)
        self._next_decoder = target + 1
        x = h + self._attention(target, h)
        moe_in = self.decoder.layers[target].post_attention_layernorm(x)
        shared = self.moe_layers[layer].shared
        if shared is not None:  # every token's shared experts join the residual
            x = x + shared(moe_in)
        return x, moe_in

    def gate(self, layer: int, moe_in: torch.Tensor) -> LayerRouting:
        routing = self.moe_layers[layer].router(moe_in)
        return LayerRouting(routing.expert_ids, routing.weights)

    def last_logits(self, h: torch.Tensor) -> dict[int, torch.Tensor]:
        """Logits FloatTensor[vocab] at each segment's last row, by request key (runs the decoder
        layers after the last MoE layer first)."""
        if h.shape[0]:
            for i in range(self._next_decoder, len(self.decoder.layers)):
                h = self._whole_layer(i, h)
        self._next_decoder = len(self.decoder.layers)
        head: nn.Module = self.hf.lm_head
        return {s.key: head(self.decoder.norm(h[s.start + s.length - 1])).float() for s in self.segments}

    def forget(self, key: int) -> None:
        """Drop a finished request's cache."""
        self.cache.pop(key, None)


def text_codec(folder: str) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """(encode, decode) of a checkpoint folder: its own tokenizer when it has one, else lina's
    byte tokens (tiny checkpoints have a 256-token vocabulary)."""
    from lina.hf.tokens import has_tokenizer
    from lina.serve.requests import decode, encode

    if not has_tokenizer(folder):
        return encode, decode
    from lina.hf.families import require_transformers

    tokenizer = require_transformers().AutoTokenizer.from_pretrained(str(folder))
    return (
        lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"]),
        lambda ids: tokenizer.decode(ids),
    )

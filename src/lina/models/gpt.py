"""A GPT-style decoder language model whose FFNs are (every ``moe_interval``-th, after the first
``first_k_dense``) MoE layers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lina.config import ModelConfig
from lina.moe.comm_context import ExpertComm
from lina.moe.layer import MoELayer
from lina.moe.spec import ExpertSpec, MoESpec, SharedExpertSpec


def moe_spec(cfg: ModelConfig) -> MoESpec:
    """The MoE parts of the built-in GPT's settings (the default: lina's own layer)."""
    return MoESpec(expert=ExpertSpec(cfg.expert), shared=SharedExpertSpec(d_ff=cfg.shared_expert_d_ff))


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, S, d] -> [B, S, d]."""
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool, comm: ExpertComm | None):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        if moe:
            self.ffn: nn.Module = MoELayer(
                cfg.d_model,
                cfg.d_ff,
                cfg.experts,
                cfg.top_k,
                cfg.capacity_factor,
                cfg.dropless,
                cfg.balance_loss_weight,
                cfg.z_loss_weight,
                cfg.gate_noise,
                comm,
                spec=moe_spec(cfg),
            )
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class MoEGPT(nn.Module):
    """Decoder LM. ``forward(idx: LongTensor[B, S]) -> logits FloatTensor[B, S, vocab]``.

    ``moe_layers()`` lists the MoE layers in order; ``aux_loss()`` sums their router losses of the
    last forward.
    """

    def __init__(self, cfg: ModelConfig, comm: ExpertComm | None = None):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, moe=cfg.is_moe(i), comm=comm) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for i, layer in enumerate(self.moe_layers()):
            layer.layer_index = i
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("fc2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and not hasattr(module.weight, "lina_expert"):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def aux_loss(self) -> torch.Tensor:
        losses = [m.aux_loss for m in self.moe_layers()]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, s = idx.shape
        pos = torch.arange(s, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (total loss for backward, language-model cross-entropy alone)."""
        logits = self.forward(idx)
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return lm + self.aux_loss(), lm

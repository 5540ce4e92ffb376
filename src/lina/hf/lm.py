"""A transformers checkpoint as the language model ``lina train`` and ``lina infer`` drive: lina's
byte tokens in, logits out, the MoE layers listed, the router losses summed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lina.hf.errors import HFModelError
from lina.moe.comm_context import ExpertComm

BYTE_VOCAB = 256


def checkpoint_model_fields(folder: str | Path) -> dict[str, Any]:
    """The ``[model]`` settings a checkpoint folder fixes (experts, top-k, widths, depth,
    vocabulary), read from its config.json after checking the folder holds readable weights of a
    supported family. Raises :class:`HFModelError` (exit 2) naming the problem and the fix."""
    from lina.hf.blocks import block_shape
    from lina.hf.checkpoint import CheckpointReader, check_family
    from lina.hf.families import FAMILIES

    reader = CheckpointReader(folder)
    raw = reader.config()
    family = FAMILIES[check_family(raw)]
    from lina.hf.families import require_transformers

    config = require_transformers().AutoConfig.from_pretrained(str(reader.folder))
    shape = block_shape(family, config)
    from lina.hf.tokens import has_tokenizer

    if config.vocab_size < BYTE_VOCAB and not has_tokenizer(reader.folder):
        raise HFModelError(
            f"{folder} has a vocabulary of {config.vocab_size} tokens and no tokenizer, so lina's byte tokens "
            f"0-255 do not fit. Fix: save the checkpoint's tokenizer into the folder, or use one with at least "
            f"{BYTE_VOCAB} tokens"
        )
    return {
        "experts": shape.num_experts,
        "top_k": shape.top_k,
        "d_model": shape.d_model,
        "d_ff": shape.d_ff,
        "n_layers": int(config.num_hidden_layers),
        "n_heads": int(config.num_attention_heads),
        "vocab_size": int(config.vocab_size),
        "max_positions": int(config.max_position_embeddings),
    }


class HFCausalLM(nn.Module):
    """``forward(idx: LongTensor[B, S]) -> logits FloatTensor[B, S, vocab]`` of a loaded checkpoint.

    ``moe_layers()`` lists its lina MoE layers; ``aux_loss()`` sums their router losses of the last
    forward; ``loss(idx, targets)`` -> (total for backward, cross-entropy alone), targets already
    shifted as lina's batches are. ``head`` is the output projection; ``cfg`` carries
    ``experts``, ``top_k`` and ``seq_len``.
    """

    def __init__(self, handle, seq_len: int):
        super().__init__()
        self.handle = handle
        self.hf = handle.model
        self.head = self.hf.lm_head
        first = handle.layers[0]
        self.cfg = _Shape(experts=first.num_experts, top_k=first.top_k, seq_len=seq_len)

    def moe_layers(self):
        return list(self.handle.layers)

    def aux_loss(self) -> torch.Tensor:
        return self.handle.aux_loss()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=idx, use_cache=False).logits

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.forward(idx)
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        return lm + self.aux_loss().to(lm.device), lm


class _Shape:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def hf_train_model(folder: str, groups, comm: ExpertComm | None, seq_len: int) -> HFCausalLM:
    """The checkpoint at ``folder`` with this rank's experts, its MoE layers on ``comm`` (the
    trainer's, whose hooks call its gradient-sync policy), in training mode."""
    from lina.hf.checkpoint import load_pretrained

    handle = load_pretrained(folder, groups, comm=comm)
    model = HFCausalLM(handle, seq_len)
    return model.train()


def load_hf_for_inference(folder: str, seq_len: int) -> HFCausalLM:
    """The checkpoint at ``folder``, every expert in this process, in eval mode."""
    from lina.hf.checkpoint import load_pretrained

    return HFCausalLM(load_pretrained(folder), seq_len).eval()

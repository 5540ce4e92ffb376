"""Tiny random checkpoints of every supported family, built from a config (never downloaded).

``tiny_config(family)`` gives a transformers config small enough for CPU tests (vocabulary 256,
so lina's byte tokens fit); ``make_tiny(family, out_dir, seed)`` builds the model with random
weights and writes it with ``save_pretrained`` (config.json + model.safetensors).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lina.hf.families import FAMILIES, require_transformers

#: what every tiny config shares: 256-token byte vocabulary, width 32, 4 heads
_COMMON = dict(
    vocab_size=256,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

_TINY = {
    "mixtral": dict(intermediate_size=48, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_hidden_layers=3,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
    ),
    "qwen3_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=24,
        num_hidden_layers=2,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        head_dim=8,
        decoder_sparse_step=1,
    ),
    "olmoe": dict(
        intermediate_size=24, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False
    ),
    "deepseek_v3": dict(
        intermediate_size=64,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        rope_interleave=True,
        num_key_value_heads=4,
    ),
}


#: scaled-down shapes of each family for ``lina bench train --family`` (width 256, 4 layers)
BENCH_SHAPES = {
    "mixtral": dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2
    ),
    "qwen3_moe": dict(
        hidden_size=256,
        moe_intermediate_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_experts=64,
        num_experts_per_tok=8,
        head_dim=64,
    ),
    "deepseek_v3": dict(
        hidden_size=256,
        moe_intermediate_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_rope_head_dim=32,
        qk_nope_head_dim=32,
        v_head_dim=64,
    ),
}


def make_bench_family(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """A random checkpoint of ``family`` in its :data:`BENCH_SHAPES` shape, written to ``out_dir``."""
    return make_tiny(family, out_dir, seed=seed, **BENCH_SHAPES[family])


def tiny_config(family: str, **overrides):
    """A transformers config of ``family`` (one of :data:`lina.hf.families.FAMILIES`), tiny."""
    transformers = require_transformers()
    if family not in _TINY:
        from lina.hf.errors import unsupported

        raise unsupported(family)
    cls = getattr(transformers, FAMILIES[family].config_class)
    return cls(**{**_COMMON, **_TINY[family], **overrides})


def tiny_model(family: str, seed: int = 0, **overrides):
    """A ``...ForCausalLM`` of ``family`` with random weights (fp32, eval mode). DeepSeek-V3's
    correction bias gets random values too, so that selection really depends on it."""
    transformers = require_transformers()
    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    model = getattr(transformers, FAMILIES[family].model_class)(cfg).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.rand(buf.shape) * 0.1)
    return model


def make_tiny(family: str, out_dir: str | Path, seed: int = 0, max_shard_size: str | None = None, **overrides) -> Path:
    """Write a tiny random checkpoint of ``family`` to ``out_dir`` (``max_shard_size`` e.g.
    "20KB" writes a sharded one with an index). Returns the folder."""
    out = Path(out_dir)
    model = tiny_model(family, seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out

"""lina's own GPT with the new MoE parts: SwiGLU experts, a shared expert and dense first layers
train like any other setting, and the inference engine serves SwiGLU + shared-expert models with
the plain model's outputs."""

import pytest
import torch

from lina.config import ModelConfig
from lina.errors import ConfigError
from lina.infer.engine import InferenceEngine
from lina.infer.model_adapter import ServedGPT
from lina.infer.policies import make_serving_policy
from lina.models.gpt import MoEGPT
from lina.moe.layer import MoELayer

CFG = dict(d_model=32, n_layers=3, n_heads=2, d_ff=32, seq_len=16, experts=4, top_k=2)


def _tokens(seed):
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_dense_first_layers_and_swiglu_shared_experts():
    cfg = ModelConfig(**CFG, expert="swiglu", shared_expert_d_ff=24, first_k_dense=1)
    cfg.validate()
    torch.manual_seed(0)
    model = MoEGPT(cfg)
    kinds = [isinstance(b.ffn, MoELayer) for b in model.blocks]
    assert kinds == [False, True, True]
    layer = model.moe_layers()[0]
    assert layer.experts.param_names == ("w1", "w2") and layer.shared.down_proj.weight.shape == (32, 24)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = _tokens(0)
    losses = []
    for _ in range(8):
        loss, lm = model.loss(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(lm.detach()))
    assert losses[-1] < losses[0]


def test_invalid_settings_are_rejected():
    with pytest.raises(ConfigError, match="model.expert"):
        ModelConfig(**CFG, expert="relu").validate()
    with pytest.raises(ConfigError, match="no MoE layer is left"):
        ModelConfig(**CFG, first_k_dense=3).validate()


@pytest.mark.parametrize("expert,shared", [("gelu", 0), ("swiglu", 0), ("swiglu", 24)])
def test_engine_serves_swiglu_and_shared_experts(expert, shared):
    cfg = ModelConfig(**{**CFG, "n_layers": 2}, expert=expert, shared_expert_d_ff=shared)
    torch.manual_seed(0)
    model = MoEGPT(cfg).eval()
    served = ServedGPT(model)
    engine = InferenceEngine(
        served.store, cfg.top_k, None, make_serving_policy("static", cfg.experts, 1, cfg.top_k, cfg.n_layers)
    )
    x = _tokens(3)
    with torch.no_grad():
        h, _ = engine.run_batch(served.embed(x), served.dense, served.gate)
        torch.testing.assert_close(served.logits(h), model(x), atol=1e-5, rtol=0)

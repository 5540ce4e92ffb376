"""A transformers MoE model with its sparse blocks swapped for lina layers (one process, every
expert) gives the logits, input gradients and parameter gradients of the original."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from hf_helpers import (
    ATOL,
    FAMILIES,
    assert_grads_match,
    batch,
    hf_grads,
    lina_grads,
    loss_and_input_grad,
)  # noqa: E402
from lina.hf.errors import HFModelError  # noqa: E402
from lina.hf.swap import expert_parallel  # noqa: E402
from lina.hf.tiny import tiny_model  # noqa: E402
from lina.moe.layer import MoELayer  # noqa: E402


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("grouped_mm", [False, True])
def test_swapped_model_equals_hf(family, grouped_mm):
    torch.manual_seed(0)
    hf = tiny_model(family, seed=1)
    swapped = copy.deepcopy(hf)
    ep = expert_parallel(swapped, grouped_mm=grouped_mm)
    assert len(ep.layers) >= 1 and all(isinstance(m, MoELayer) for m in ep.layers)
    assert all(getattr(p, "lina_expert", False) for m in ep.layers for p in m.experts.parameters())
    ids, labels = batch(3)
    ref_logits, ref_loss, ref_dx = loss_and_input_grad(hf, ids, labels)
    logits, loss, dx = loss_and_input_grad(swapped, ids, labels)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(dx, ref_dx, atol=ATOL, rtol=0)
    assert_grads_match(lina_grads(swapped), hf_grads(hf))


def test_olmoe_keeps_unnormalised_weights():
    """OLMoE does not renormalise its top-k weights; a swap that did would differ by ~1e-3."""
    hf = tiny_model("olmoe", seed=1)
    swapped = copy.deepcopy(hf)
    ep = expert_parallel(swapped)
    assert ep.layers[0].router.spec.norm_topk_prob is False
    ids, _ = batch(5)
    with torch.no_grad():
        torch.testing.assert_close(swapped(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)


def test_settings_lina_does_not_reproduce_are_refused():
    with pytest.raises(HFModelError, match="router_jitter_noise=0.1.*Fix: set config.router_jitter_noise = 0"):
        expert_parallel(tiny_model("mixtral", router_jitter_noise=0.1))
    with pytest.raises(HFModelError, match="hidden_act='gelu'.*Fix"):
        expert_parallel(tiny_model("olmoe", hidden_act="gelu"))


def test_unsupported_architecture_is_named():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(HFModelError, match="unsupported architecture 'llama'.*mixtral"):
        expert_parallel(model)


@pytest.mark.parametrize("rate", [0.0, 0.002])
def test_deepseek_correction_bias_moves_toward_balance(rate):
    """A batch of four distinct tokens routes unevenly (busiest expert 2.5-3.3x the mean load);
    the auxiliary-loss-free update brings every layer under 2x within 40 steps, and without it
    (rate 0) the load stays as skewed."""
    model = tiny_model("deepseek_v3", seed=1)
    ep = expert_parallel(model, bias_update_rate=rate)
    model.train()
    ids = torch.randint(0, 4, (8, 16), generator=torch.Generator().manual_seed(0))
    imbalance = []
    with torch.no_grad():
        for _ in range(40):
            model(ids)
            imbalance.append([float(load.max() / load.mean()) for load in ep.update_routing_bias()])
    assert len(imbalance[0]) == 2 and min(imbalance[0]) > 2.4
    if rate == 0:
        assert imbalance[-1] == imbalance[0]
    else:
        assert all(max(step) < 2.0 for step in imbalance[-5:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it on one)")
@pytest.mark.parametrize("grouped_mm", [False, True])
def test_swapped_model_equals_hf_on_cuda(grouped_mm):
    """The world-size-1 equivalence on a GPU, fp32 (no TF32), for Qwen3-MoE."""
    torch.backends.cuda.matmul.allow_tf32 = False
    hf = tiny_model("qwen3_moe", seed=1).cuda()
    swapped = copy.deepcopy(hf)
    expert_parallel(swapped, grouped_mm=grouped_mm)
    ids, labels = (t.cuda() for t in batch(3))
    ref_logits, _, ref_dx = loss_and_input_grad(hf, ids, labels)
    logits, _, dx = loss_and_input_grad(swapped, ids, labels)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(dx, ref_dx, atol=ATOL, rtol=0)
    assert_grads_match(lina_grads(swapped), hf_grads(hf))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it on one)")
def test_grouped_experts_equal_per_expert_in_bf16_on_cuda():
    """Where CUDA runs grouped_mm (bf16), grouped SwiGLU experts equal per-expert ones within bf16
    rounding (2e-2 relative to the output scale)."""
    from lina.moe.experts import LocalExperts, grouped_mm_supported
    from lina.moe.spec import ExpertSpec

    dev = torch.device("cuda")
    if not grouped_mm_supported(dev, torch.bfloat16):
        pytest.skip("grouped_mm does not run on this GPU in bf16")
    torch.manual_seed(0)
    loop = LocalExperts(8, 64, 128, list(range(8)), spec=ExpertSpec("swiglu")).to(dev, torch.bfloat16)
    grouped = copy.deepcopy(loop)
    grouped.spec = ExpertSpec("swiglu", grouped_mm=True)
    counts = [40, 0, 13, 7, 64, 1, 30, 5]
    rows = torch.randn(sum(counts), 64, device=dev, dtype=torch.bfloat16)
    a, b = loop(rows, counts).float(), grouped(rows, counts).float()
    assert grouped.uses_grouped_mm(rows)
    torch.testing.assert_close(b, a, atol=2e-2 * float(a.abs().max()), rtol=0)

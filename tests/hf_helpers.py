"""Shared helpers of the Hugging Face interop tests: tiny models, batches, and gradient lookup
that maps lina's expert parameters back onto the transformers block's fused ones."""

from __future__ import annotations

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
ATOL = 1e-5  # fp32; only the blocking of matmuls over different row groupings differs


def batch(seed: int, b: int = 2, s: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (b, s), generator=g)
    return ids, torch.randint(0, 256, (b, s), generator=g)


def loss_and_input_grad(model, ids: torch.Tensor, labels: torch.Tensor):
    """Forward from embeddings (so the input gradient exists) -> (logits, loss, d loss / d embeds)."""
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    out = model(inputs_embeds=emb, labels=labels)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), emb.grad


def hf_grads(model) -> dict[str, torch.Tensor]:
    """Parameter gradients of a transformers model, keyed the way a swapped model names them
    (fused experts as lina's w1 [E, d, 2f] and w2 [E, f, d])."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad
        if name.endswith("experts.gate_up_proj"):
            out[name.replace("experts.gate_up_proj", "experts.w1")] = g.transpose(1, 2)
        elif name.endswith("experts.down_proj"):
            out[name.replace("experts.down_proj", "experts.w2")] = g.transpose(1, 2)
        elif ".mlp.gate.weight" in name:
            out[name.replace(".mlp.gate.weight", ".mlp.router.gate.weight")] = g
        elif ".mlp.shared_expert_gate." in name:
            out[name.replace(".mlp.shared_expert_gate.", ".mlp.shared.gate.")] = g
        elif ".mlp.shared_expert." in name or ".mlp.shared_experts." in name:
            out[name.replace(".mlp.shared_experts.", ".mlp.shared.").replace(".mlp.shared_expert.", ".mlp.shared.")] = g
        else:
            out[name] = g
    return out


def lina_grads(model, global_ids_of=None) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_match(
    swapped: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], expert_ids: list[int] | None = None
):
    """Every swapped gradient equals the reference's (expert ones: the rows of ``expert_ids``)."""
    assert swapped, "no gradients"
    for name, g in swapped.items():
        if name not in ref:  # a policy gives every parameter a gradient, zero where none flowed
            assert float(g.abs().sum()) == 0.0, name
            continue
        r = ref[name]
        if expert_ids is not None and (name.endswith("experts.w1") or name.endswith("experts.w2")):
            r = r[expert_ids]
        torch.testing.assert_close(g, r, atol=ATOL, rtol=0, msg=name)

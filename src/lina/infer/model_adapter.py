"""Serve a trained :class:`lina.models.gpt.MoEGPT` with the inference engine, and record the
routing it takes (a :class:`lina.data.routing_trace.RoutingTrace`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lina.data.routing_trace import RoutingTrace
from lina.errors import ConfigError, LinaError
from lina.infer.engine import LayerRouting
from lina.infer.store import ExpertStore
from lina.models.gpt import MoEGPT


class ServedGPT:
    """The non-expert parts of a full (single-process) MoEGPT as the engine's ``dense`` and
    ``gate`` callables, and its experts as an :class:`ExpertStore`.

    Every FFN must be an MoE layer (``moe_interval = 1``, ``first_k_dense = 0``). GELU or SwiGLU
    experts; a shared expert's output joins the residual in ``dense``. Inputs are LongTensor[B, S] tokens.
    """

    def __init__(self, model: MoEGPT):
        if model.cfg.moe_interval != 1 or model.cfg.first_k_dense != 0:
            raise LinaError(
                "serving needs every FFN to be an MoE layer (model.moe_interval = 1, model.first_k_dense = 0)"
            )
        self.model = model.eval()
        moes = model.moe_layers()
        stack = lambda name: torch.stack([getattr(m.experts, name).detach() for m in moes])  # noqa: E731
        if model.cfg.expert == "swiglu":
            self.store = ExpertStore(stack("w1"), None, stack("w2"), None)
        else:
            self.store = ExpertStore(stack("w1"), stack("b1"), stack("w2"), stack("b2"))
        self.shape: tuple[int, int] = (0, 0)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """LongTensor[B, S] -> FloatTensor[B*S, d]."""
        self.shape = tuple(idx.shape)
        pos = torch.arange(idx.shape[1])
        return (self.model.tok_emb(idx) + self.model.pos_emb(pos)).reshape(-1, self.model.cfg.d_model)

    def dense(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.model.blocks[layer]
        x = h.view(*self.shape, -1)
        x = x + block.attn(block.ln1(x))
        moe_in = block.ln2(x)
        if block.ffn.shared is not None:  # every token's shared expert joins the residual
            x = x + block.ffn.shared(moe_in)
        return x.reshape(h.shape), moe_in.reshape(h.shape)

    def gate(self, layer: int, moe_in: torch.Tensor) -> LayerRouting:
        routing = self.model.blocks[layer].ffn.router(moe_in)
        return LayerRouting(routing.expert_ids, routing.weights)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.ln_f(h.view(*self.shape, -1)))


@torch.no_grad()
def record_routing(model: MoEGPT, batches: list[torch.Tensor], source: str) -> RoutingTrace:
    """Run ``model`` on token batches (each LongTensor[B, S]) and keep every token's experts and
    gate weights at every MoE layer; each sequence gets its own ``seq_id``."""
    model.eval()
    experts, probs, seq_ids, positions = [], [], [], []
    seq = 0
    for idx in batches:
        model(idx)
        routings = [m.last_routing for m in model.moe_layers()]
        experts.append(torch.stack([r.expert_ids for r in routings], dim=1))  # [B*S, L, k]
        probs.append(torch.stack([r.weights for r in routings], dim=1))
        b, s = idx.shape
        seq_ids.append(torch.arange(seq, seq + b).repeat_interleave(s))
        positions.append(torch.arange(s).repeat(b))
        seq += b
    return RoutingTrace(
        experts=torch.cat(experts).numpy().astype(np.int16),
        seq_id=torch.cat(seq_ids).numpy().astype(np.int32),
        token_idx=torch.cat(positions).numpy().astype(np.int32),
        num_experts=model.cfg.experts,
        top_k=model.cfg.top_k,
        gate_probs=torch.cat(probs).float().numpy(),
        source=source,
    )


def load_trained_model(out_dir: str | Path) -> MoEGPT:
    """Rebuild the full model, in one process: from a ``lina train`` output folder (its latest
    checkpoint, every expert read by global id) or from a ``lina export`` folder."""
    from lina.train.export import is_export, load_exported, model_from_run

    out = Path(out_dir)
    if is_export(out):
        return load_exported(out)
    if (out / "hf-model").is_dir():
        raise ConfigError(
            "model", f"{out} fine-tuned a Hugging Face checkpoint", f"lina infer --hf-model {out / 'hf-model'}"
        )
    if not (out / "checkpoints").is_dir():
        raise ConfigError(
            "model",
            f"{out} holds neither checkpoints/ nor an exported model",
            "point --model at the --out folder of a `lina train` run or at a `lina export` folder",
        )
    return model_from_run(out)[0]

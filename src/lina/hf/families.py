"""The transformers model families lina can swap experts into, and how each names its parts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """One family: its transformers classes and how its checkpoints name an MoE block's tensors.

    Attributes:
        sparse_block: class name of the sparse MoE block (the module lina swaps; the decoder
            layer holds it as ``mlp``).
        block_key: the block's name inside a decoder layer in checkpoints (``model.layers.{i}.<key>``).
        expert_keys: per-expert weight names in checkpoints: gate, up, down (``[f, d]``, ``[f, d]``,
            ``[d, f]``, as ``nn.Linear`` weights).
        shared_key / shared_gate_key: the shared expert's and its gate's names, "" for none.
    """

    model_type: str
    config_class: str
    model_class: str
    sparse_block: str
    block_key: str = "mlp"
    expert_keys: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_key: str = ""
    shared_gate_key: str = ""


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "mixtral",
            "MixtralConfig",
            "MixtralForCausalLM",
            "MixtralSparseMoeBlock",
            block_key="block_sparse_moe",
            expert_keys=("w1", "w3", "w2"),
        ),
        Family(
            "qwen2_moe",
            "Qwen2MoeConfig",
            "Qwen2MoeForCausalLM",
            "Qwen2MoeSparseMoeBlock",
            shared_key="shared_expert",
            shared_gate_key="shared_expert_gate",
        ),
        Family("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "Qwen3MoeSparseMoeBlock"),
        Family("olmoe", "OlmoeConfig", "OlmoeForCausalLM", "OlmoeSparseMoeBlock"),
        Family(
            "deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM", "DeepseekV3MoE", shared_key="shared_experts"
        ),
    )
}


def family_of(config) -> Family:
    """The :class:`Family` of a transformers config, or an error naming the supported ones."""
    from lina.hf.errors import unsupported

    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise unsupported(str(model_type))
    return FAMILIES[model_type]


def require_transformers():
    """Import transformers, or raise an error that says how to install it."""
    try:
        import transformers
    except ImportError:
        from lina.errors import LinaError

        raise LinaError(
            "Hugging Face support needs transformers and safetensors. Fix: pip install 'lina[hf]'"
        ) from None
    return transformers

"""Hugging Face interop (``pip install 'lina[hf]'``): swap the sparse MoE blocks of a transformers
model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3) for lina MoE layers holding this rank's
experts, load such a model from a checkpoint folder reading only this rank's experts, and save it
back with the experts gathered.

    from lina.hf import expert_parallel, load_pretrained, save_pretrained
"""

from lina.hf.checkpoint import load_pretrained, save_pretrained
from lina.hf.swap import ExpertParallel, expert_parallel

__all__ = ["ExpertParallel", "expert_parallel", "load_pretrained", "save_pretrained"]

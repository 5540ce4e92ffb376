#!/usr/bin/env bash
# The CUDA check of lina's MoE layer, prepared for a machine with one NVIDIA GPU and an environment
# that has a CUDA build of torch, transformers and safetensors installed.
#
#   scripts/gpu_check.sh [PYTHON] [OUT_DIR]      (defaults: python3, runs/gpu-check)
#
# 1. the Hugging Face equivalence tests at world size 1 on the GPU (Qwen3-MoE swapped into lina
#    layers: logits, input and parameter gradients within 1e-5 in fp32; grouped SwiGLU experts
#    against per-expert ones in bf16);
# 2. `lina bench layer` on the GPU: the default GELU layer, and 64 SwiGLU experts top-8 in fp32 and
#    bf16 (per-expert against grouped_mm experts where the GPU runs them).
# Each benchmark writes JSON (with provenance) under OUT_DIR; the console log goes to OUT_DIR/log.txt.
set -euo pipefail
PY=${1:-python3}
OUT=${2:-runs/gpu-check}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
{
  "$PY" - <<'PYEOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch " + torch.__version__ + "; run this on a GPU machine")
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
PYEOF
  "$PY" -m pytest -q -p no:cacheprovider tests/test_hf_swap.py -k cuda -rs
  "$PY" -m lina bench layer --device cuda --json "$OUT/layer-gelu-fp32.json"
  "$PY" -m lina bench layer --device cuda --expert swiglu --experts 64 --top-k 8 --json "$OUT/layer-swiglu64-fp32.json"
  "$PY" -m lina bench layer --device cuda --expert swiglu --experts 64 --top-k 8 --dtype bfloat16 \
    --json "$OUT/layer-swiglu64-bf16.json"
} 2>&1 | tee "$OUT/log.txt"

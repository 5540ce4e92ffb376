"""``lina generate --hf-model``: greedy outputs through the expert-parallel engine equal the
Hugging Face model's own ``generate`` token for token, under every placement, for tiny
checkpoints of several families (dense decoder layers, shared experts and group-limited routing
included)."""

import functools
import json

import pytest
import torch

pytest.importorskip("transformers")

from conftest import run_lina  # noqa: E402
from lina.hf.checkpoint import load_pretrained  # noqa: E402
from lina.hf.lm import HFCausalLM  # noqa: E402
from lina.hf.tiny import make_tiny  # noqa: E402
from lina.infer.engine import InferenceEngine  # noqa: E402
from lina.infer.policies import SERVING_POLICIES, make_serving_policy  # noqa: E402
from lina.serve.cached_hf import CachedHF  # noqa: E402
from lina.serve.generator import generate  # noqa: E402
from lina.serve.requests import Request, encode  # noqa: E402
from lina.serve.worker import fit_estimator  # noqa: E402

PROMPTS = ["def main():", "import os\n", "class A(B):\n    x = 1", "for i in range(10):"]
NEW = (9, 4, 7, 1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: make_tiny(f, root / f, seed=1) for f in ("mixtral", "qwen3_moe", "deepseek_v3", "qwen2_moe")}


@functools.cache
def _hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@functools.cache
def hf_generate(folder, tokens: tuple[int, ...], new: int) -> list[int]:
    """The Hugging Face model's own greedy generate, in one process."""
    model = _hf_model(folder)
    with torch.no_grad():
        out = model.generate(torch.tensor([tokens]), max_new_tokens=new, do_sample=False)
    return out[0, len(tokens) :].tolist()


def _requests() -> list[Request]:
    return [Request(str(i), p, encode(p), n, i) for i, (p, n) in enumerate(zip(PROMPTS, NEW))]


@pytest.mark.parametrize(
    "family,placement",
    [("mixtral", p) for p in SERVING_POLICIES]
    + [("qwen3_moe", "lina"), ("deepseek_v3", "lina"), ("qwen2_moe", "eplb")],
)
def test_one_process_equals_hugging_face_generate(checkpoints, family, placement):
    folder = checkpoints[family]
    handle = load_pretrained(folder)
    served, requests = CachedHF(handle), _requests()
    estimator = fit_estimator(HFCausalLM(handle, served.context), requests) if placement == "lina" else None
    store = served.store
    policy = make_serving_policy(placement, store.num_experts, 1, served.top_k, store.num_layers, estimator)
    generations, stats = generate(served, InferenceEngine(store, served.top_k, None, policy), requests)
    assert stats.steps == max(NEW)
    for g, r in zip(generations, requests, strict=True):
        assert g.tokens == hf_generate(folder, tuple(r.tokens), r.max_new_tokens), (family, r.prompt)
    assert not served.cache  # finished requests drop their caches


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("placement", list(SERVING_POLICIES))
def test_four_workers_equal_hugging_face_generate(checkpoints, tmp_path, family, placement):
    folder = checkpoints[family]
    prompts = tmp_path / "prompts.jsonl"
    # three requests on four workers: one worker serves none; requests end at different lengths
    prompts.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "prompt": p, "max_new_tokens": n}) + "\n"
            for i, (p, n) in enumerate(zip(PROMPTS[:3], NEW))
        )
    )
    out = tmp_path / "out.jsonl"
    res = run_lina(
        "generate",
        "--hf-model",
        str(folder),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--workers",
        "4",
        "--placement",
        placement,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["r0", "r1", "r2"]
    for row, n in zip(rows, NEW, strict=False):
        assert row["tokens"] == hf_generate(folder, tuple(encode(row["prompt"])), n), row["id"]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["generated_tokens"] == sum(NEW[:3]) and summary["placement"] == placement

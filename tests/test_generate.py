"""``lina generate``: the served outputs equal the plain model's, whatever the placement, the
worker count or the requests per rank; bad input is refused before any worker starts."""

import json

import pytest
import torch

from conftest import run_lina
from lina.config import ModelConfig
from lina.errors import ConfigError
from lina.infer.engine import InferenceEngine
from lina.infer.model_adapter import load_trained_model
from lina.infer.policies import all_serving_policies, make_serving_policy
from lina.models.gpt import MoEGPT
from lina.serve.cached_gpt import CachedGPT
from lina.serve.generator import generate
from lina.serve.reference import reference_generate
from lina.serve.requests import Request, encode, read_requests
from lina.serve.sampling import request_generator
from lina.serve.worker import fit_estimator

PROMPTS = ["def main():", "import os\n", "class A(B):\n    x = 1", "for i in range(10):"]


def _model() -> MoEGPT:
    torch.manual_seed(0)
    return MoEGPT(ModelConfig(d_model=32, n_layers=3, n_heads=2, d_ff=64, seq_len=64, experts=4, top_k=2)).eval()


def _requests(new=(9, 4, 7, 1)) -> list[Request]:
    return [Request(str(i), p, encode(p), n, i) for i, (p, n) in enumerate(zip(PROMPTS, new))]


@pytest.mark.parametrize("placement", list(all_serving_policies()))
def test_one_process_equals_the_plain_model_under_every_placement(placement):
    model, requests = _model(), _requests()
    estimator = fit_estimator(model, requests, placement)
    served = CachedGPT(model)
    engine = InferenceEngine(served.store, 2, None, make_serving_policy(placement, 4, 1, 2, 3, estimator))
    generations, stats = generate(served, engine, requests)
    assert stats.steps == max(r.max_new_tokens for r in requests)
    for g, r in zip(generations, requests, strict=True):
        assert g.tokens == reference_generate(model, r.tokens, r.max_new_tokens), r.prompt
        assert len(g.token_latencies_s) == r.max_new_tokens - 1 and g.ttft_s > 0
    assert not served.cache  # finished requests drop their caches


def test_seeded_sampling_equals_the_reference_with_the_same_generator():
    model, requests = _model(), _requests()
    served = CachedGPT(model)
    engine = InferenceEngine(served.store, 2, None, make_serving_policy("static", 4, 1, 2, 3))
    generations, _ = generate(served, engine, requests, temperature=0.8, seed=5)
    for g, r in zip(generations, requests, strict=True):
        ref = reference_generate(model, r.tokens, r.max_new_tokens, 0.8, request_generator(5, r.index))
        assert g.tokens == ref


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"prompt": "a"}\n{"prompt": \n', "prompts.jsonl:2 is not JSON"),
        ('{"id": 1}\n', 'prompts.jsonl:1 has no non-empty "prompt"'),
        ('{"prompt": "' + "x" * 60 + '"}\n', "exceeds the model's context of 64"),
        ('{"prompt": "a", "max_new_tokens": 0}\n', "max_new_tokens 0"),
        ("\n\n", "holds no prompt"),
    ],
)
def test_bad_prompt_files_name_the_line_and_the_fix(tmp_path, text, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_requests(path, 8, 64)
    assert message in str(err.value) and "Fix:" in str(err.value)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    config = folder / "tiny.toml"
    config.write_text(
        "steps = 2\nbatch_size = 2\neval_every = 2\neval_batches = 1\ncorpus_max_mb = 0.3\n"
        "[model]\nd_model = 32\nn_layers = 3\nn_heads = 2\nd_ff = 64\nseq_len = 64\n[output]\ncheckpoint_every = 2\n"
    )
    res = run_lina("train", "--config", str(config), "--workers", "2", "--out", str(folder / "run"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    prompts = folder / "prompts.jsonl"
    # three requests on four workers: one worker serves none; requests end at different lengths
    prompts.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "prompt": p, "max_new_tokens": n}) + "\n"
            for i, (p, n) in enumerate(zip(PROMPTS[:3], (10, 3, 6)))
        )
    )
    return folder / "run", prompts


@pytest.mark.slow
@pytest.mark.parametrize("placement", list(all_serving_policies()))
def test_four_workers_equal_the_plain_model(trained, tmp_path, placement):
    model_dir, prompts = trained
    out = tmp_path / "out.jsonl"
    res = run_lina(
        "generate",
        "--model",
        str(model_dir),
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
    model = load_trained_model(model_dir)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["r0", "r1", "r2"]
    for row, n in zip(rows, (10, 3, 6), strict=True):
        assert row["tokens"] == reference_generate(model, encode(row["prompt"]), n)
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["generated_tokens"] == 19 and summary["token_latency_s"]["p95"] > 0 and "provenance" in summary
    if placement == "lina-auto":  # the arms' measured steps per class: every step's but the last
        served = [a["batches"] for arms in summary["placement_arms"].values() for a in arms.values()]
        assert sum(served) == 10 - 1 and set(summary["placement_arms"]["<=4 tokens"]) == {"lina", "static", "eplb"}


@pytest.mark.slow
def test_bad_input_exits_2_before_workers_start(trained, tmp_path):
    model_dir, prompts = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    res = run_lina(
        "generate", "--model", str(model_dir), "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl"), timeout=120
    )
    assert res.returncode == 2 and "bad.jsonl:2" in res.stderr and "Traceback" not in res.stderr
    res = run_lina(
        "generate",
        "--model",
        str(model_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--placement",
        "best",
        timeout=120,
    )
    assert res.returncode == 2 and "placement" in res.stderr

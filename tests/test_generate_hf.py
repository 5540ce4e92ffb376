"""``lina generate --hf-model``: greedy outputs through the expert-parallel engine equal the
Hugging Face model's own ``generate`` token for token, under every placement, for tiny
checkpoints of several families (dense decoder layers, shared experts and group-limited routing
included)."""

import functools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from conftest import lina_cmd, run_lina  # noqa: E402
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
    + [("qwen3_moe", "lina"), ("deepseek_v3", "lina"), ("qwen2_moe", "eplb"), ("qwen3_moe", "lina-window")],
)
def test_one_process_equals_hugging_face_generate(checkpoints, family, placement):
    folder = checkpoints[family]
    handle = load_pretrained(folder)
    served, requests = CachedHF(handle), _requests()
    estimator = fit_estimator(HFCausalLM(handle, served.context), requests, placement)
    store = served.store
    policy = make_serving_policy(placement, store.num_experts, 1, served.top_k, store.num_layers, estimator)
    generations, stats = generate(served, InferenceEngine(store, served.top_k, None, policy), requests)
    assert stats.steps == max(NEW)
    for g, r in zip(generations, requests, strict=True):
        assert g.tokens == hf_generate(folder, tuple(r.tokens), r.max_new_tokens), (family, r.prompt)
    assert not served.cache  # finished requests drop their caches


# every placement on 4 workers, each with one of the two families (the one-process test above
# takes every pair); a launch of 4 workers costs tens of seconds on a 2-core machine
FOUR_WORKER_CASES = [
    ("mixtral", "static"),
    ("qwen3_moe", "static"),
    ("mixtral", "eplb"),
    ("qwen3_moe", "lina"),
    ("mixtral", "oracle"),
]
assert {p for _, p in FOUR_WORKER_CASES} == set(SERVING_POLICIES)


@pytest.mark.slow
@pytest.mark.parametrize("family,placement", FOUR_WORKER_CASES)
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
    sources = summary["placement_sources"]  # one entry per MoE layer, every step counted
    assert len(sources) == 2
    steps = max(NEW[:3])
    if placement == "lina":  # layer 0 has no path: planned on the real counts; layer 1 from a phase-1 source
        assert sources[0] == {"real": steps}
        assert sources[1].get("estimate", 0) + sources[1].get("recent_counts", 0) == steps
    else:
        assert sources == [{{"static": "static", "eplb": "history", "oracle": "real"}[placement]: steps}] * 2


def _fails(argv, capsys, *needles):
    from lina.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in err


def test_bad_input_exits_2_before_any_worker_starts(checkpoints, tmp_path, capsys):
    folder, out = str(checkpoints["mixtral"]), str(tmp_path / "o.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "x", "max_new_tokens": "many"}\n')
    base = ["generate", "--hf-model", folder, "--out", out, "--workers", "4"]
    _fails([*base, "--prompts", str(bad)], capsys, "bad.jsonl:2", "Fix:")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "y" * 120}) + "\n")  # the tiny checkpoints have 128 positions
    _fails([*base, "--prompts", str(long)], capsys, "long.jsonl:1", "exceeds the model's context of 128")
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "ok"}\n')
    _fails([*base, "--prompts", str(good), "--placement", "best"], capsys, "unknown placement 'best'", "static")
    _fails([*base, "--prompts", str(good), "--model", folder], capsys, "exactly one of --model and --hf-model")
    _fails([*base[:3], "--out", out, "--workers", "3", "--prompts", str(good)], capsys, "8 experts", "3 workers")


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return kids + [d for k in kids for d in _descendants(k)]


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "zombie" not in next(line for line in status.splitlines() if line.startswith("State:"))


@pytest.mark.slow
def test_a_worker_killed_mid_generation_ends_the_job_with_its_rank_named(checkpoints, tmp_path):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"x{i}", "max_new_tokens": 120}) + "\n" for i in range(8)))
    argv = ["generate", "--hf-model", str(checkpoints["mixtral"]), "--prompts", str(prompts)]
    argv += ["--out", str(tmp_path / "o.jsonl"), "--workers", "4", "--timeout", "60"]
    proc = subprocess.Popen(lina_cmd(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("step 10") or not line:
            break
    assert line.startswith("step 10"), "decoding did not start"
    # the launcher spawns the workers in rank order
    workers = sorted(
        p for p in _descendants(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="ignore")
    )
    assert len(workers) == 4
    everyone = _descendants(proc.pid)
    os.kill(workers[2], signal.SIGKILL)
    killed_at = time.time()
    _, err = proc.communicate(timeout=120)
    assert time.time() - killed_at < 60
    assert proc.returncode != 0
    assert "rank 2 on host" in err and "signal 9" in err and "Traceback" not in err, err
    time.sleep(1)
    assert not [p for p in everyone if _running(p)], "processes left behind"

"""``lina hf make-tiny``, ``lina train --hf-model`` and ``lina infer --hf-model``: tiny checkpoints
are made locally, bad checkpoints and contradicting options exit with code 2 and a message
naming the problem and the fix, before any worker starts."""

import pytest

pytest.importorskip("transformers")

from lina.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    assert main(["hf", "make-tiny", "--family", "mixtral", "--out", str(out)]) == 0
    assert main(["hf", "make-tiny", "--family", "deepseek_v3", "--out", str(out), "--max-shard-size", "40KB"]) == 0
    return out


def _fails(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in err


def test_make_tiny_writes_loadable_folders(tiny):
    assert (tiny / "mixtral" / "config.json").is_file() and (tiny / "mixtral" / "model.safetensors").is_file()
    assert (tiny / "deepseek_v3" / "model.safetensors.index.json").is_file()


def test_train_rejects_bad_checkpoints(tiny, tmp_path, capsys):
    _fails(["train", "--hf-model", str(tmp_path / "missing")], capsys, "does not exist", "Fix:")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tiny / "mixtral" / "config.json").read_text())
    _fails(["train", "--hf-model", str(tmp_path / "empty")], capsys, "holds no safetensors weights", "Fix:")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text((tiny / "mixtral" / "config.json").read_text())
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not a safetensors file")
    _fails(["train", "--hf-model", str(tmp_path / "bad")], capsys, "corrupt safetensors", "Fix: re-save")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "llama" / "model.safetensors").write_bytes((tiny / "mixtral" / "model.safetensors").read_bytes())
    _fails(["train", "--hf-model", str(tmp_path / "llama")], capsys, "unsupported architecture 'llama'", "Fix:")


def test_train_rejects_layouts_the_checkpoint_cannot_take(tiny, capsys):
    _fails(
        ["train", "--hf-model", str(tiny / "mixtral"), "--workers", "3"],
        capsys,
        "8 experts cannot be sharded evenly over an expert-parallel group of 3",
        "Fix:",
    )
    _fails(
        ["train", "--hf-model", str(tiny / "mixtral"), "--experts", "4"],
        capsys,
        "contradicts the checkpoint's 8",
        "drop --experts",
    )


def test_infer_rejects_bad_input(tiny, capsys):
    _fails(
        ["infer", "--hf-model", str(tiny / "mixtral"), "--model", "x"], capsys, "exactly one of --model and --hf-model"
    )
    _fails(["infer", "--hf-model", str(tiny / "mixtral"), "--seq-len", "1000"], capsys, "checkpoint's positions")


@pytest.mark.slow
def test_train_then_infer_with_a_checkpoint(tiny, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    cfg = tmp_path / "small.toml"
    cfg.write_text(
        "eval_every = 2\neval_batches = 1\nbatch_size = 2\n[model]\nseq_len = 32\n[output]\ncheckpoint_every = 2\n"
    )
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg),
                "--hf-model",
                str(tiny / "deepseek_v3"),
                "--workers",
                "2",
                "--steps",
                "4",
                "--policy",
                "lina",
                "--chunk-mb",
                "0.01",
                "--corpus",
                str(corpus),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    # the fine-tuned export is sharded like its source (deepseek_v3 above: 40KB shards)
    assert (out / "summary.json").is_file() and (out / "hf-model" / "model.safetensors.index.json").is_file()
    assert main(["infer", "--model", str(out)]) == 2  # a model folder of the wrong kind is bad input
    assert "Fix: lina infer --hf-model" in capsys.readouterr().err
    trace = tmp_path / "trace.npz"
    assert (
        main(
            [
                "infer",
                "--hf-model",
                str(out / "hf-model"),  # the fine-tuned export
                "--corpus",
                str(corpus),
                "--sequences",
                "8",
                "--seq-len",
                "32",
                "--record-trace",
                str(trace),
            ]
        )
        == 0
    )
    from lina.data.routing_trace import load_trace

    t = load_trace(trace)
    assert (t.num_tokens, t.num_layers, t.top_k, t.num_experts) == (256, 2, 2, 8)


def _losses(out):
    import json

    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_hf_model_resume_and_packing_keep_the_trajectory(tiny, tmp_path):
    """A run resumed from its step-3 checkpoint repeats the uninterrupted run's losses bit for
    bit; a run that packs all 8 experts onto every rank at step 3 (pure data parallelism) agrees
    within 1e-4 relative (sums in another order)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("for i in range(10):\n    print(i * i)\n" * 400)
    cfg = tmp_path / "small.toml"
    cfg.write_text(
        "eval_every = 3\neval_batches = 1\nbatch_size = 2\n[model]\nseq_len = 32\n[output]\ncheckpoint_every = 3\n"
    )
    common = [
        "train",
        "--config",
        str(cfg),
        "--hf-model",
        str(tiny / "mixtral"),
        "--workers",
        "2",
        "--policy",
        "tutel",
        "--corpus",
        str(corpus),
    ]
    straight, resumed, packed = tmp_path / "straight", tmp_path / "resumed", tmp_path / "packed"
    assert main(common + ["--steps", "6", "--out", str(straight)]) == 0
    assert main(common + ["--steps", "3", "--out", str(resumed)]) == 0
    assert main(common + ["--steps", "6", "--out", str(resumed), "--resume"]) == 0
    assert main(common + ["--steps", "6", "--out", str(packed), "--packing", "8@3"]) == 0
    a, b, c = _losses(straight), _losses(resumed), _losses(packed)
    assert sorted(b) == list(range(6)) and all(a[s] == b[s] for s in range(6)), (a, b)
    assert all(abs(a[s] - c[s]) <= 1e-4 * abs(a[s]) for s in range(6)), (a, c)
    # each run exports its fine-tuned checkpoint, experts gathered from the layout it ended in (EP 2;
    # after packing, every rank holding all experts): the same weights, and unlike the start's
    import torch
    from safetensors.torch import load_file

    w_straight, w_resumed = (load_file(str(d / "hf-model" / "model.safetensors")) for d in (straight, resumed))
    w_packed, w_start = (
        load_file(str(d)) for d in (packed / "hf-model" / "model.safetensors", tiny / "mixtral" / "model.safetensors")
    )
    assert set(w_straight) == set(w_packed) == set(w_start)
    for key in w_start:
        assert torch.equal(w_straight[key], w_resumed[key]), key
        torch.testing.assert_close(w_packed[key], w_straight[key], atol=1e-4, rtol=0)
    assert not torch.equal(
        w_straight["model.layers.1.block_sparse_moe.experts.7.w2.weight"],
        w_start["model.layers.1.block_sparse_moe.experts.7.w2.weight"],
    )


@pytest.mark.netns
@pytest.mark.skipif(
    __import__("os").geteuid() != 0 or __import__("shutil").which("tc") is None,
    reason="needs root and tc for the emulated cluster",
)
@pytest.mark.slow
def test_bench_train_quick_with_a_checkpoint(tiny, tmp_path):
    """``lina bench train --hf-model``: every policy runs the checkpoint's model on the emulated
    cluster, with its 8 experts (the measured numbers are only checked for presence)."""
    import json

    out = tmp_path / "bench.json"
    assert main(["bench", "train", "--quick", "--hf-model", str(tiny / "mixtral"), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["model"]["hf_model"].endswith("mixtral") and data["model"]["experts"] == 8
    cfg = data["configs"][0]
    for name in ("ddp-overlap", "sequential", "tutel", "lina"):
        assert cfg["policies"][name]["step_time_s_median"] > 0

"""``lina bench layer --expert swiglu`` times SwiGLU experts per expert and grouped (where the
device runs grouped_mm) and writes both with provenance (measured numbers: only presence and
sanity are asserted)."""

import json

import torch

from lina.cli import main
from lina.moe.experts import grouped_mm_supported


def test_bench_layer_swiglu_reports_grouped_and_per_expert(tmp_path, capsys):
    out = tmp_path / "layer.json"
    assert (
        main(
            [
                "bench",
                "layer",
                "--quick",
                "--expert",
                "swiglu",
                "--tokens",
                "128",
                "--d-model",
                "32",
                "--d-ff",
                "32",
                "--experts",
                "8",
                "--top-k",
                "2",
                "--repeats",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["shape"]["expert"] == "swiglu" and "provenance" in data
    assert data["median_ms"]["experts"] > 0 and data["median_ms"]["moe"] > 0
    grouped = grouped_mm_supported(torch.device("cpu"), torch.float32)
    assert data["grouped_mm"] == grouped
    if grouped:
        assert data["median_ms"]["experts_grouped"] > 0 and data["experts_per_expert_over_grouped"] > 0
        assert "per-expert / grouped" in capsys.readouterr().out


def test_bench_layer_rejects_missing_cuda(capsys):
    if torch.cuda.is_available():
        return
    assert main(["bench", "layer", "--quick", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err

"""Resume on another layout: worker count, EP size, packing. The resumed run's losses equal those
of an uninterrupted run of the new layout within a stated tolerance.

The global batch is the same in every pair (batches are a function of the global sequence index,
lina.data.corpus.sample_sequences) and the router's balance loss is off (it is computed per rank,
so it depends on how the batch is split), so the arithmetic differs only in summation order:
an expert's gradient summed in one matmul or over ranks, allreduces over another number of
ranks. Losses agree within REL_TOL relative.
"""

import json
from pathlib import Path

import pytest

from conftest import TINY_TOML, run_lina

REL_TOL = 1e-5
STEPS = 8  # the first run stops after step 3 (its checkpoint), the second resumes at step 4


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(STEPS))
    return [r["loss"] for r in rows]


def _train(config: Path, out: Path, *args: str) -> str:
    res = run_lina("train", "--config", str(config), "--out", str(out), *args, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


W2, W4 = ["--workers", "2", "--batch-size", "4"], ["--workers", "4", "--batch-size", "2"]  # global batch 8 both
CASES = {
    # name: (options of the first run, options of the resumed run = the new layout)
    "4 workers from a 2-worker checkpoint": (W2, W4),
    "2 workers from a 4-worker checkpoint": (W4, W2),
    "EP 4 from EP 2": (W4 + ["--ep-size", "2"], W4 + ["--ep-size", "4"]),
    "EP 2 after a packing change": (W2 + ["--packing", "2@2"], W2 + ["--ep-size", "2"]),
}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", list(CASES))
def test_resume_on_another_layout_follows_the_new_layouts_trajectory(tmp_path, case):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML.replace("[model]", "[model]\nbalance_loss_weight = 0.0"))
    first, new = CASES[case]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(config, straight, "--steps", str(STEPS), *new)
    _train(config, resumed, "--steps", "4", *first)
    out = _train(config, resumed, "--steps", str(STEPS), "--resume", *new)
    assert "resumed from" in out and "step-0000003" in out
    a, b = _losses(straight), _losses(resumed)
    for step in range(4, STEPS):
        assert abs(a[step] - b[step]) <= REL_TOL * abs(a[step]), (case, step, a[step], b[step])
    if "packing" not in case:  # the first run used the same global batch, so its steps agree too
        for step in range(4):
            assert abs(a[step] - b[step]) <= REL_TOL * abs(a[step]), (case, step, a[step], b[step])
    if case.startswith("4 workers"):  # a multi-rank checkpoint exports to one single-process model
        _export_matches_the_run(resumed, tmp_path / "export")


def _export_matches_the_run(run: Path, folder: Path) -> None:
    import torch

    pytest.importorskip("safetensors")
    from lina.train.export import load_exported, model_from_run

    res = run_lina("export", "--model", str(run), "--out", str(folder))
    assert res.returncode == 0, res.stderr
    exported, (from_run, _) = load_exported(folder), model_from_run(run)
    a, b = exported.state_dict(), from_run.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(exported(x), from_run(x))

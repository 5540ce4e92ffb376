"""`lina train --packing` end to end: a bad setting is refused before workers start; a change of
packing mid-run is logged, recorded per step and in the checkpoint, and resuming from a checkpoint
written after the change rebuilds that packing and repeats the same losses."""

import json
from pathlib import Path

import pytest

from conftest import run_lina

TOML = """
steps = 6
batch_size = 4
eval_every = 100
eval_batches = 1
corpus_max_mb = 0.3
[model]
d_model = 32
n_layers = 2
n_heads = 2
d_ff = 64
seq_len = 32
experts = 2
[output]
checkpoint_every = 2
log_every = 1
"""


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # starts the CLI in a subprocess (a second or more each)
def test_bad_packing_is_rejected_before_workers_start():
    res = run_lina("train", "--workers", "4", "--experts", "4", "--packing", "3", timeout=60)
    assert res.returncode == 2, res.stderr
    assert "packing" in res.stderr and "Fix:" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_packing_change_logs_checkpoints_and_resumes(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TOML)
    out = tmp_path / "run"
    first = run_lina("train", "--config", str(cfg), "--workers", "2", "--packing", "2@2", "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert "packing before step 2: 1 -> 2 experts per rank" in first.stdout
    rows = _rows(out)
    assert [r["experts_per_rank"] for r in rows] == [1, 1, 2, 2, 2, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["packing"]["experts_per_rank"] == 2 and summary["packing"]["ep_size"] == 1
    # Resume from the checkpoint after step 3 (written at 2 experts per rank), with packing off:
    # the run rebuilds the checkpoint's packing, keeps it, and repeats steps 4 and 5 exactly.
    ckpt = out / "checkpoints"
    (ckpt / "latest").write_text("step-0000003\n")
    second = run_lina("train", "--config", str(cfg), "--workers", "2", "--out", str(out), "--resume")
    assert second.returncode == 0, second.stderr
    resumed = _rows(out)
    assert [r["step"] for r in resumed] == list(range(6))
    assert [r["experts_per_rank"] for r in resumed[4:]] == [2, 2]
    assert [r["loss"] for r in resumed[4:]] == [r["loss"] for r in rows[4:]]

"""`lina train` end to end: bad configs, learning, resume, and a worker that dies."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import lina_cmd, run_lina


@pytest.mark.parametrize(
    "args,field",
    [
        (["--experts", "6", "--workers", "4"], "experts"),
        (["--top-k", "5", "--experts", "4"], "top_k"),
        (["--capacity-factor", "0"], "capacity_factor"),
        (["--workers", "0"], "workers"),
        (["--corpus", "/nonexistent/text"], "corpus"),
        (["--chunk-mb", "-3"], "chunk_mb"),
    ],
)
@pytest.mark.slow  # starts the CLI in a subprocess (a second or more each)
def test_bad_config_is_rejected_before_workers_start(args, field):
    res = run_lina("train", *args, timeout=60)
    assert res.returncode == 2, res.stderr
    assert field in res.stderr and "Fix:" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow  # starts the CLI in a subprocess (a second or more each)
def test_unknown_policy_in_config_file(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('policy = "fastest"\n')
    res = run_lina("train", "--config", str(cfg), timeout=60)
    assert (
        res.returncode == 2
        and "policy" in res.stderr
        and "lina+packing" in res.stderr
        and "Traceback" not in res.stderr
    )
    cfg.write_text('schedule = "fastest"\n')  # the old name of the setting: accepted, with a note
    res = run_lina("train", "--config", str(cfg), timeout=60)
    assert res.returncode == 2 and "now called 'policy'" in res.stderr and "'fastest'" in res.stderr
    cfg.write_text('policy = "lina-priority"\n')  # a simulator-only policy
    res = run_lina("train", "--config", str(cfg), timeout=60)
    assert res.returncode == 2 and "simulator only" in res.stderr
    cfg.write_text("[model]\nexpertz = 3\n")
    res = run_lina("train", "--config", str(cfg), timeout=60)
    assert res.returncode == 2 and "model.expertz" in res.stderr


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_training_lowers_loss_and_writes_outputs(tmp_path, tiny_config):
    out = tmp_path / "run"
    trace = tmp_path / "trace"
    res = run_lina(
        "train",
        "--config",
        str(tiny_config),
        "--workers",
        "2",
        "--steps",
        "30",
        "--out",
        str(out),
        "--trace",
        str(trace),
    )
    assert res.returncode == 0, res.stderr
    # the trace streams to its file while the trainer keeps only recent spans: still every step
    for rank in (0, 1):
        steps = [
            r["args"]["step"]
            for r in map(json.loads, (trace / f"timeline-rank{rank}.jsonl").read_text().splitlines())
            if r["cat"] == "step"
        ]
        assert steps == list(range(30))
    assert (trace / "trace.json").exists() and (trace / "timeline.png").exists()
    losses = _losses(out)
    assert len(losses) == 30
    first, last = sum(losses[s] for s in range(3)) / 3, sum(losses[s] for s in range(27, 30)) / 3
    assert last < first - 0.5, (first, last)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("step", "loss", "step_time_s", "a2a_time_s", "allreduce_time_s"):
        assert key in row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss"] > 0 and summary["tokens_per_s"] > 0
    # what the simulator's calibration needs from a run: the backend and the chunk size in effect
    assert summary["backend"] == "gloo" and summary["chunk_mb_resolved"] > 0
    assert summary["provenance"]["lina"] and summary["provenance"]["command"]
    assert (out / "checkpoints" / "latest").exists()
    assert "validation loss" in res.stdout and "tokens/s" in res.stdout


@pytest.mark.slow
def test_resume_continues_the_same_loss_trajectory(tmp_path, tiny_config):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert (
        run_lina(
            "train", "--config", str(tiny_config), "--workers", "2", "--steps", "10", "--out", str(straight)
        ).returncode
        == 0
    )
    first = run_lina("train", "--config", str(tiny_config), "--workers", "2", "--steps", "6", "--out", str(resumed))
    assert first.returncode == 0, first.stderr
    second = run_lina(
        "train", "--config", str(tiny_config), "--workers", "2", "--steps", "10", "--out", str(resumed), "--resume"
    )
    assert second.returncode == 0, second.stderr
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == list(range(10))
    for step in range(10):
        assert a[step] == b[step], (step, a[step], b[step])  # bit-identical: same arithmetic


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return kids + [d for k in kids for d in _descendants(k)]


def _running(pid: int) -> bool:
    """Alive and not a zombie (a reaped-later zombie holds no resources)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return "zombie" not in state


@pytest.mark.slow
def test_killed_worker_stops_the_job(tmp_path, tiny_config):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        lina_cmd("train", "--config", str(tiny_config), "--workers", "2", "--steps", "100000", "--out", str(out)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.5)
    assert (out / "metrics.jsonl").exists(), "training did not start"
    workers = [p for p in _descendants(proc.pid) if "spawn" in Path(f"/proc/{p}/cmdline").read_text(errors="ignore")]
    assert workers, "no worker processes found"
    victim = workers[-1]
    everyone = _descendants(proc.pid)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    _, err = proc.communicate(timeout=90)
    assert time.time() - killed_at < 60
    assert proc.returncode != 0
    assert "rank" in err and "failed" in err and "Traceback" not in err
    time.sleep(1)
    alive = [p for p in everyone if _running(p)]
    assert not alive, f"processes left behind: {alive}"

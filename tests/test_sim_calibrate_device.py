"""``lina sim --calibrate`` on a device-time run: no CPU host term, and the report says so."""

import pytest

from conftest import run_lina
from lina.data.routing_trace import synthetic_trace
from lina.sim.calibration import calibrate, find_runs, predict, report_text


@pytest.mark.netns
@pytest.mark.slow  # trains 2 ranks on emulated hosts in a subprocess (about 40 s)
def test_calibration_of_a_device_time_run_uses_no_cpu_host_model(tmp_path):
    import os
    import shutil

    if os.geteuid() != 0 or shutil.which("tc") is None:
        pytest.skip("needs root and tc for the emulated cluster")
    trace = tmp_path / "trace.npz"
    synthetic_trace(4000, 4, 4, top_k=2, skew=1.3, seed=3).save(trace)  # the default model: 4 layers, 4 experts
    run = tmp_path / "run"
    res = run_lina(
        "train", "--workers", "2", "--steps", "8", "--policy", "sequential", "--compute", "a100", "--dilation", "100",
        "--routing-trace", str(trace), "--emulate", "hosts=2,link=10gbit,workers_per_host=1",
        "--skip-dilation-check", "--out", str(run), "--trace", str(run), timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rep = calibrate(run)
    (row,) = rep.rows
    assert row["device_mode"] and row["compute"] == "a100-80gb-bf16 time x 100"
    (record,) = find_runs(run)
    assert record.device_mode and record.dilation == 100
    cluster = rep.fit.cluster_for(record)
    assert cluster.host is None and cluster.fairness == "flow"  # network terms only
    assert rep.fit.exponent_for(record) == 0.0
    profile = rep.fit.profile_at(record, 0.5)
    assert profile.slowdown_in_a2a == 0.0 and profile.allreduce_slowdown_in_compute == 0.0
    assert predict(rep.fit, record).step_s == pytest.approx(row["predicted_s"])
    text = report_text(rep)
    assert "device-mode runs: 1 of 1" in text and "compute a100-80gb-bf16 time x 100" in text

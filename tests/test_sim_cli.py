"""``lina sim`` end to end: listing, one scenario, a TOML config, a sweep, calibration, errors."""

from __future__ import annotations

import json

import pytest

from lina.cli import main
from lina.sim.compute import ComputeProfile
from lina.sim.spec import ClusterSpec, ModelSpec, TrainSpec
from lina.testing.calibration import write_synthetic_run


def test_list_prints_name_gpus_description(capsys):
    assert main(["sim", "--list"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    names = {}
    for line in lines:
        name, gpus, *desc = line.split()
        names[name] = gpus
        assert desc
    assert names["paper-testbed"] == "2-16"
    assert names["testbed-gpt2-e16"] == "16"
    assert int(names["dgx-128x8-400g"]) == 1024
    assert any(n.startswith("infer-") for n in names)


def test_one_scenario_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["sim", "--scenario", "testbed-txl-e4", "--json", str(out), "--policies", "ddp-overlap,lina"]) == 0
    text = capsys.readouterr().out
    assert "ddp-overlap" in text and "speedup" in text and "regime: link 100 Gb/s" in text
    data = json.loads(out.read_text())
    assert data["gpus"] == 4
    pol = data["policies"]
    assert set(pol) == {"ddp-overlap", "lina"}
    assert pol["ddp-overlap"]["speedup"] == 1.0
    for key in ("step_s", "a2a_s", "a2a_share", "bwd_a2a_s", "allreduce_s", "exposed_comm_s"):
        assert pol["lina"][key] >= 0
    assert out.with_suffix(".png").stat().st_size > 1000


def test_config_file(tmp_path, capsys):
    cfg = tmp_path / "mine.toml"
    cfg.write_text(
        """
name = "mine"
policies = ["ddp-overlap", "lina+packing"]
device = "h100-sxm-bf16"
[cluster]
hosts = 4
gpus_per_host = 8
link_gbps = 200
nics_per_host = 8
[model]
layers = 4
d_model = 1024
d_ff = 4096
experts = 32
top_k = 2
seq_len = 2048
batch_size = 2
[train]
allreduce_algorithm = "hierarchical"
"""
    )
    out = tmp_path / "mine.json"
    assert main(["sim", "--config", str(cfg), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["gpus"] == 32
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster]\nhosts = 2\ngpus_per_host = 1\nlink_gbps = 10\nwarp = 9\n[model]\nlayers = 1\n")
    assert main(["sim", "--config", str(bad)]) == 2
    assert "warp" in capsys.readouterr().err
    # uneven routing: the all-to-alls move the busiest rank's bytes, so they take longer
    skewed = tmp_path / "skewed.toml"
    skewed.write_text(cfg.read_text() + "a2a_skew = 1.5\n")
    assert main(["sim", "--config", str(skewed), "--json", str(tmp_path / "skewed.json")]) == 0
    a2a = lambda path: json.loads(path.read_text())["policies"]["ddp-overlap"]["a2a_s"]  # noqa: E731
    assert a2a(tmp_path / "skewed.json") > 1.2 * a2a(out)
    skewed.write_text(cfg.read_text() + "a2a_skew = 0.5\n")
    assert main(["sim", "--config", str(skewed)]) == 2
    assert "a2a_skew" in capsys.readouterr().err


def test_unknown_scenario_is_a_config_error(capsys):
    assert main(["sim", "--scenario", "no-such-thing"]) == 2
    assert "--list" in capsys.readouterr().err


def test_link_sweep_writes_json_and_png(tmp_path, capsys):
    assert (
        main(
            [
                "sim",
                "--sweep",
                "link",
                "--scenario",
                "testbed-gpt2-e8",
                "--values",
                "50,200",
                "--out",
                str(tmp_path),
                "--policies",
                "ddp-overlap,lina",
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "sweep-link-testbed-gpt2-e8.json").read_text())
    assert data["values"] == [50.0, 200.0] and len(data["runs"]) == 2
    assert (tmp_path / "sweep-link-testbed-gpt2-e8.png").stat().st_size > 1000
    assert (
        main(["sim", "--sweep", "gpus", "--scenario", "testbed-gpt2-e16", "--values", "6", "--out", str(tmp_path)]) == 2
    )


@pytest.mark.slow
def test_calibrate_command(tmp_path, capsys):
    prof = ComputeProfile(2e-6, 4e-6, 3e-6, 6e-6, optimizer_s_per_param=1e-9)
    model = ModelSpec(
        "tiny", layers=2, d_model=128, d_ff=256, experts=4, top_k=2, seq_len=64, batch_size=4, vocab=128, act_bytes=4
    )
    for i, gbps in enumerate((0.1, 0.3)):
        cluster = ClusterSpec(hosts=2, gpus_per_host=2, link_gbps=gbps, launch_s=5e-4, per_peer_s=0)
        write_synthetic_run(tmp_path / f"r{i}", cluster, model, prof, TrainSpec(), "ddp-overlap", steps=3)
    out = tmp_path / "cal.json"
    assert main(["sim", "--calibrate", str(tmp_path), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "median |error|" in text and "predicted ms" in text
    assert json.loads(out.read_text())["median_abs_error"] < 0.1


@pytest.mark.slow
def test_calibrate_with_held_out_runs(tmp_path, capsys):
    """Runs under --holdout are predicted with the fit of the others and reported apart."""
    prof = ComputeProfile(2e-6, 4e-6, 3e-6, 6e-6, optimizer_s_per_param=1e-9)
    model = ModelSpec(
        "tiny", layers=2, d_model=128, d_ff=256, experts=4, top_k=2, seq_len=64, batch_size=4, vocab=128, act_bytes=4
    )
    for folder, gbps in (("fit/a", 0.1), ("fit/b", 0.3), ("held/c", 0.2)):
        cluster = ClusterSpec(hosts=2, gpus_per_host=2, link_gbps=gbps, launch_s=5e-4, per_peer_s=0)
        write_synthetic_run(tmp_path / folder, cluster, model, prof, TrainSpec(), "ddp-overlap", steps=3)
    out = tmp_path / "cal.json"
    assert (
        main(["sim", "--calibrate", str(tmp_path / "fit"), "--holdout", str(tmp_path / "held"), "--json", str(out)])
        == 0
    )
    assert "held-out median |error|" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 2 and len(data["holdout_rows"]) == 1
    assert out.with_suffix(".png").stat().st_size > 1000  # measured against predicted
    assert abs(data["holdout_rows"][0]["error"]) < 0.1  # a link rate between the fitted ones
    assert main(["sim", "--holdout", str(tmp_path / "held")]) == 2
    # several folders fit together
    assert main(["sim", "--calibrate", str(tmp_path / "fit"), str(tmp_path / "held"), "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())["rows"]) == 3

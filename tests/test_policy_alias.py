"""``deepspeed`` was the name of lina's re-creation of DeepSpeed-MoE's schedule; it is now
``ddp-overlap`` (the real DeepSpeed runs as ``lina bench train --peers``), and the old name is still
accepted everywhere a policy is named, with a note."""

import json

from lina.cli import main
from lina.config import TrainConfig, load_toml
from lina.policy import BASELINE_POLICY, BENCH_POLICIES, TRAIN_POLICIES, train_policy, training
from lina.sim import scenarios


def _forget_notes():
    training._noted.clear()


def test_the_baseline_is_ddp_overlap_and_deepspeed_is_not_registered():
    assert BASELINE_POLICY == "ddp-overlap" and BENCH_POLICIES[0] == "ddp-overlap"
    assert "deepspeed" not in TRAIN_POLICIES
    spec = TRAIN_POLICIES["ddp-overlap"]
    assert (spec.a2a_split, spec.grad_sync, spec.priority, spec.packing) == ("none", "ddp", False, False)


def test_old_name_resolves_with_one_note(capsys):
    _forget_notes()
    assert train_policy("deepspeed") is train_policy("ddp-overlap")
    assert train_policy("deepspeed/no-sync").name == "ddp-overlap/no-sync"
    err = capsys.readouterr().err
    assert err.count("'deepspeed' is now called 'ddp-overlap'") == 1


def test_config_and_toml_take_the_old_name(tmp_path, capsys):
    _forget_notes()
    assert TrainConfig(policy="deepspeed").policy == "ddp-overlap"
    path = tmp_path / "c.toml"
    path.write_text('policy = "deepspeed"\nworkers = 2\n')
    assert TrainConfig.from_dict(load_toml(path)).policy == "ddp-overlap"
    assert "is now called 'ddp-overlap'" in capsys.readouterr().err


def test_sim_reports_the_new_name_for_the_old_one(tmp_path):
    out = tmp_path / "sim.json"
    assert main(["sim", "--scenario", "testbed-txl-e4", "--json", str(out), "--policies", "deepspeed,lina"]) == 0
    pols = json.loads(out.read_text())["policies"]
    assert set(pols) == {"ddp-overlap", "lina"} and pols["ddp-overlap"]["speedup"] == 1.0
    assert scenarios.get("testbed-txl-e4").with_policies(("deepspeed",)).policies == ("ddp-overlap",)

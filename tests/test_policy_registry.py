"""One registry of training policies: the trainer, ``lina bench train`` and ``lina sim`` all run a
policy from its spec, so a policy of one's own is one spec and one registration, in any module."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from torch import nn

from conftest import ROOT, lina_cmd
from lina.comm.groups import build_groups
from lina.comm.policies import make_sync
from lina.config import CommConfig, ModelConfig, PackingConfig, TrainConfig
from lina.data.corpus import load_corpus
from lina.errors import ConfigError
from lina.obs.timeline import Timeline
from lina.policy import BENCH_POLICIES, TRAIN_POLICIES, TrainPolicy, train_policy
from lina.testing.multiproc import run_ranks
from lina.train.trainer import Trainer

TOY_MODULE = """
from lina.policy import TrainPolicy, register_train_policy

TOY = register_train_policy(TrainPolicy(
    "toy-pipelined-after", a2a_split="tutel", grad_sync="after", priority=False, packing=False,
    description="toy: all-to-all pipelined with the FFN, every allreduce after backward",
))
"""


def test_every_benchmarked_policy_is_registered_and_trainable():
    for name in BENCH_POLICIES:
        assert train_policy(name).trainable, name
    assert train_policy("lina+packing").packing and not train_policy("lina").packing
    assert not train_policy("lina-priority").trainable
    bound = train_policy("lina/no-sync")  # a policy's measured lower bound: its allreduce off
    assert bound.grad_sync == "none" and bound.a2a_split == "micro" and bound.trainable
    with pytest.raises(ConfigError, match="unknown training policy"):
        train_policy("fastest")
    with pytest.raises(ConfigError, match="priority"):
        TrainPolicy("bad", "micro", "microops", False, False, "micro-ops need the priority scheduler")


def test_config_refuses_a_timing_only_policy():
    with pytest.raises(ConfigError, match="timing only"):
        TrainConfig(policy="lina/no-sync").validate()


def test_config_packing_follows_the_policy_unless_set():
    assert TrainConfig(policy="lina+packing").effective_packing == "auto"
    assert TrainConfig(policy="lina+packing", packing=PackingConfig(mode="2")).effective_packing == "2"
    assert TrainConfig(policy="lina").effective_packing == "off"
    assert TrainConfig().policy == "lina"
    assert TrainConfig.from_dict({"schedule": "tutel"}).policy == "tutel"
    with pytest.raises(ConfigError, match="both"):
        TrainConfig.from_dict({"schedule": "tutel", "policy": "lina"})


@pytest.mark.parametrize("name", [n for n, p in TRAIN_POLICIES.items() if p.trainable])
def test_sync_object_is_built_from_the_spec(name):
    spec = train_policy(name)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    sync = make_sync(spec, model=model, dp_group=None, expert_dp_group=None, world_size=1, timeline=Timeline(0))
    assert sync.name == name and sync.pipelined == spec.pipelined
    sync.close()


def test_simulator_only_policy_cannot_train():
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="simulator only"):
        make_sync("lina-priority", model=model, dp_group=None, expert_dp_group=None, world_size=1, timeline=Timeline(0))


@pytest.fixture
def toy_env(tmp_path):
    (tmp_path / "toy_policy.py").write_text(TOY_MODULE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow  # starts the CLI in a subprocess (a second or more each)
def test_own_policy_runs_in_the_simulator(toy_env, tmp_path):
    out = tmp_path / "sim.json"
    res = subprocess.run(
        lina_cmd("sim", "--scenario", "testbed-txl-e4", "--policies", "ddp-overlap,toy_policy:TOY", "--json", str(out)),
        capture_output=True,
        text=True,
        env=toy_env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    assert "toy-pipelined-after" in text or "toy_policy:TOY" in text


@pytest.mark.slow
def test_own_policy_trains_with_the_same_losses_as_sequential(toy_env, tmp_path, tiny_config):
    """Allreduce after backward, like ``sequential``, with the all-to-all pipelined: the same
    losses within the stated 1e-4 relative tolerance (pipelining reorders expert sums)."""
    losses = {}
    for policy in ("sequential", "toy_policy:TOY"):
        out = tmp_path / policy.replace(":", "-")
        res = subprocess.run(
            lina_cmd(
                "train",
                "--config",
                str(tiny_config),
                "--workers",
                "2",
                "--steps",
                "6",
                "--policy",
                policy,
                "--out",
                str(out),
            ),
            capture_output=True,
            text=True,
            env=toy_env,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"summary (policy {policy})" in res.stdout
        losses[policy] = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    for a, b in zip(losses["sequential"], losses["toy_policy:TOY"], strict=True):
        assert abs(a - b) <= 1e-4 * abs(a)


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tc") is None, reason="needs root and tc for the emulated cluster"
)
def test_own_policy_runs_in_bench_train(toy_env, tmp_path):
    out = tmp_path / "train.json"
    res = subprocess.run(
        lina_cmd(
            "bench", "train", "--quick", "--policies", "ddp-overlap,sequential,toy_policy:TOY", "--json", str(out)
        ),
        capture_output=True,
        text=True,
        env=toy_env,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    cfg = json.loads(out.read_text())["configs"][0]
    assert cfg["policies"]["toy_policy:TOY"]["step_time_s_median"] > 0


def _no_sync_step(rank, world):
    torch.set_num_threads(1)
    cfg = TrainConfig(
        model=ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=32, experts=2, top_k=1),
        workers=world,
        batch_size=4,
        comm=CommConfig(chunk_mb="0.01"),
        corpus_max_mb=0.3,
        policy="lina",
    )
    trainer = Trainer(cfg, build_groups(world, 60.0), load_corpus("", 0.3))
    for step, name in enumerate(("lina", "lina/no-sync")):
        trainer.set_policy(name)
        trainer.train_step(step)
    trainer.policy.close()
    step_of = {s.args["step"]: (s.start_s, s.end_s) for s in trainer.timeline.spans() if s.cat == "step"}
    out = {}
    for step, name in enumerate(("lina", "lina/no-sync")):
        a, b = step_of[step]
        inside = [s for s in trainer.timeline.spans() if a <= s.start_s <= b]
        out[name] = (sum(1 for s in inside if s.cat == "allreduce"), sum(1 for s in inside if s.cat == "a2a"))
    return out


@pytest.mark.slow
def test_a_policys_lower_bound_runs_its_all_to_alls_without_allreduce():
    counts = run_ranks(_no_sync_step, 2, timeout_s=120)[0]
    assert counts["lina"][0] > 0 and counts["lina/no-sync"][0] == 0
    assert counts["lina/no-sync"][1] == counts["lina"][1] > 0

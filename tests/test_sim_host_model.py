"""The CPU host model: GPU clusters have none; an emulated cluster's terms come as one
``ClusterSpec.host`` (from code, a TOML ``[cluster.host]`` table, or a calibration)."""

from __future__ import annotations

import pytest

from lina.errors import ConfigError
from lina.sim.compute import ComputeProfile
from lina.sim.scenario import scenario_from_dict
from lina.sim.spec import ClusterSpec, CpuHostModel, ModelSpec, TrainSpec
from lina.sim.train import simulate_step


def test_a_gpu_cluster_has_no_host_terms():
    c = ClusterSpec(hosts=2, gpus_per_host=4, link_gbps=100.0, launch_s=1e-5)
    assert c.host is None and c.a2a_in_flight == 1 and c.allreduce_start_s == 1e-5
    for name in ("rank_copy_gbps", "flow_copy_gbps", "copy_intra", "pair_flow_loss", "allreduce_launch_s"):
        assert not hasattr(c, name), name
    hosted = ClusterSpec(
        hosts=2, gpus_per_host=4, link_gbps=100.0, host=CpuHostModel(a2a_in_flight=2, allreduce_launch_s=3e-4)
    )
    assert hosted.a2a_in_flight == 2 and hosted.allreduce_start_s == 3e-4


def test_a_toml_host_table_builds_the_model_and_bad_ones_are_named():
    base = {
        "device": "h100-sxm-bf16",
        "model": {"layers": 2, "d_model": 64, "d_ff": 128, "experts": 4, "top_k": 1, "seq_len": 16, "batch_size": 2},
    }
    sc = scenario_from_dict(
        {
            **base,
            "cluster": {
                "hosts": 4,
                "gpus_per_host": 1,
                "link_gbps": 0.2,
                "host": {"rank_copy_gbps": 0.1, "a2a_in_flight": 2},
            },
        }
    )
    assert sc.cluster.host == CpuHostModel(rank_copy_gbps=0.1, a2a_in_flight=2)
    with pytest.raises(ConfigError, match="cluster.host"):
        scenario_from_dict(
            {**base, "cluster": {"hosts": 4, "gpus_per_host": 1, "link_gbps": 0.2, "host": {"cores": 2}}}
        )
    with pytest.raises(ConfigError, match="host"):
        ClusterSpec(hosts=2, gpus_per_host=1, link_gbps=1.0, host=3)


def test_a_per_rank_copy_limit_slows_a_cpu_hosted_step():
    """The same step on a host whose ranks move all-to-all bytes at a bounded rate takes longer."""
    model = ModelSpec(
        "tiny", layers=2, d_model=128, d_ff=256, experts=4, top_k=1, seq_len=64, batch_size=4, vocab=64, act_bytes=4
    )
    profile = ComputeProfile(1e-9, 1e-9, 1e-9, 1e-9, 1e-12)
    free = ClusterSpec(hosts=4, gpus_per_host=1, link_gbps=1.0, launch_s=0.0, per_peer_s=0.0)
    bound = ClusterSpec(
        hosts=4, gpus_per_host=1, link_gbps=1.0, launch_s=0.0, per_peer_s=0.0, host=CpuHostModel(rank_copy_gbps=0.1)
    )
    fast, slow = (simulate_step(c, model, profile, TrainSpec(), "ddp-overlap") for c in (free, bound))
    assert slow.fwd_a2a_s > 5 * fast.fwd_a2a_s

"""The simulator's link sharing against the measured contention of ``lina bench contention``."""

import json
from pathlib import Path

import pytest

from conftest import run_lina
from lina.sim.contention import compare, measured_cluster, simulate_contention
from lina.sim.spec import ClusterSpec

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def test_per_connection_sharing_reproduces_the_measured_median_slowdown():
    measured = json.loads((RESULTS / "contention.json").read_text())
    result = compare(measured)
    target = measured["slowdown"]["median"]
    flow = result["simulated"]["flow"]
    assert flow["slowdown"] == pytest.approx(target, rel=0.10)
    assert flow["alone_s"] == pytest.approx(measured["alone_s"]["median"], rel=1e-6)  # the fitted efficiency
    # one equal share per collective overstates it on the peer-shared links
    assert abs(result["simulated"]["collective"]["error"]) > 0.10


def test_contention_depends_on_the_connection_counts():
    base = dict(hosts=4, gpus_per_host=1, link_gbps=0.2, launch_s=0.0, per_peer_s=0.0, hop_latency_s=0.0)
    one = simulate_contention(ClusterSpec(fairness="flow", **base), 2**20, 4 * 2**20)
    # 3 all-to-all flows against 1 ring flow per link: the a2a keeps most of the link
    assert one.slowdown == pytest.approx(4 / 3, rel=1e-3)
    many = simulate_contention(ClusterSpec(fairness="flow", allreduce_connections=3, **base), 2**20, 4 * 2**20)
    assert many.slowdown > one.slowdown + 0.2
    collective = simulate_contention(ClusterSpec(fairness="collective", **base), 2**20, 4 * 2**20)
    assert collective.slowdown == pytest.approx(2.0, rel=1e-3)


def test_measured_cluster_takes_the_runs_shape_and_rate():
    measured = json.loads((RESULTS / "contention.json").read_text())
    c = measured_cluster(measured, "flow")
    assert (c.hosts, c.gpus_per_host, c.link_gbps) == (4, 1, 0.2) and 0 < c.link_efficiency <= 1


@pytest.mark.slow  # starts the CLI in a subprocess
def test_lina_sim_contention_prints_and_writes_both_modes(tmp_path):
    out = tmp_path / "c.json"
    res = run_lina("sim", "--contention", str(RESULTS / "contention.json"), "--json", str(out), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "fairness flow" in res.stdout and "median slowdown 1.41x" in res.stdout
    data = json.loads(out.read_text())
    assert set(data["simulated"]) == {"collective", "flow"}

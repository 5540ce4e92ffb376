"""The simulator's links reproduce the all-to-all efficiency the dilation check measures."""

import json
import os
import shutil

import pytest

from conftest import run_lina
from lina.sim.calibration.a2a_efficiency import (
    emulated_cluster_spec,
    fit_a2a_link_efficiency,
    link_bound,
)
from lina.sim.collectives import all_to_all
from lina.sim.topology import Topology
from lina.sim.train import transfer_time

MIB4 = 4 << 20


def _simulated_a2a_s(hosts: int, wph: int, link_bps: float, efficiency: float) -> float:
    """One uniform all-to-all of 4 MiB per rank alone on the simulator's cluster."""
    topo = Topology(emulated_cluster_spec(hosts, wph, link_bps, efficiency))
    return transfer_time(topo, all_to_all(topo, hosts * wph, MIB4))


def _check(rows, passing):
    return {"smallest_passing": passing, "measurements": rows}


def test_fit_reproduces_a_measured_check():
    # a check on 4 hosts x 1 worker at 100 Mbit/s real, dilation 1 and 2 (both link-bound)
    rows = [
        {"dilation": 1.0, "emulated_link_bps": 100e6, "seconds": 0.4414, "ideal_s": 0.25166},
        {"dilation": 2.0, "emulated_link_bps": 50e6, "seconds": 0.8745, "ideal_s": 0.50332},
    ]
    eff = fit_a2a_link_efficiency(link_bound(_check(rows, 1.0)))
    assert 0.55 < eff < 0.6
    for row in rows:
        simulated = _simulated_a2a_s(4, 1, row["emulated_link_bps"], eff)
        assert simulated == pytest.approx(row["seconds"], rel=0.05)
    # a line-rate simulator (efficiency 1) misses them by the whole loss
    assert _simulated_a2a_s(4, 1, 100e6, 1.0) < 0.6 * rows[0]["seconds"]


def test_cpu_bound_measurements_are_left_out_of_the_fit():
    rows = [
        {"dilation": 1.0, "seconds": 0.1, "ideal_s": 0.01},  # CPU-bound: 10% of the link
        {"dilation": 2.0, "seconds": 0.1, "ideal_s": 0.02},
        {"dilation": 4.0, "seconds": 0.0667, "ideal_s": 0.04},
        {"dilation": 8.0, "seconds": 0.1333, "ideal_s": 0.08},
    ]
    kept = link_bound(_check(rows, 4.0))
    assert [r["dilation"] for r in kept] == [4.0, 8.0]
    assert fit_a2a_link_efficiency(kept) == pytest.approx(0.6, rel=0.01)
    with pytest.raises(ValueError):
        fit_a2a_link_efficiency([])


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.timeout(300)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("tc") is None, reason="needs root and tc")
def test_link_efficiency_command_measures_per_rate_and_the_fit_reproduces_it(tmp_path):
    out = tmp_path / "eff.json"
    res = run_lina("cluster", "link-efficiency", "--links", "200mbit", "--json", str(out), timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "link  200mbit:" in res.stdout and "simulator: link_efficiency = " in res.stdout
    data = json.loads(out.read_text())
    eff = data["link_efficiency"]
    assert 0.2 < eff <= 1.0
    rows = link_bound(data["checks"][0])
    assert eff == pytest.approx(fit_a2a_link_efficiency(rows))
    for row in rows:  # the simulator at that efficiency lands on every link-bound measurement
        simulated = _simulated_a2a_s(4, 1, row["emulated_link_bps"], eff)
        assert simulated == pytest.approx(row["seconds"], rel=0.10), (row, eff)


@pytest.mark.slow  # starts the CLI in a subprocess (a second or more each)
def test_link_efficiency_command_rejects_a_bad_rate():
    res = run_lina("cluster", "link-efficiency", "--links", "fast", timeout=60)
    assert res.returncode == 2 and "invalid --links" in res.stderr

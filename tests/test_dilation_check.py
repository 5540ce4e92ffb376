"""The start-up dilation check: an all-to-all alone at K and 2K; refuse a K at which the CPU, not
the emulated link, sets its speed, naming the smallest K that passes."""

import json
import os
import shutil

import pytest

from conftest import run_lina
from lina.cluster.dilation_check import A2AMeasurement, check_dilation, ideal_a2a_s, search
from lina.cluster.spec import EmulateSpec
from lina.data.routing_trace import synthetic_trace
from lina.errors import ConfigError

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tc") is None, reason="needs root and tc for the emulated cluster"
)


def _cpu_capped(real_bps: float, cpu_bps: float, nbytes: int = 3 << 20):
    """A machine whose CPU moves at most ``cpu_bps``: the all-to-all runs at min(link, CPU)."""

    def measure(k: float) -> A2AMeasurement:
        link = real_bps / k
        ideal = nbytes * 8 / link
        seconds = nbytes * 8 / min(link, cpu_bps) / 0.6  # 60% of whichever sets the pace
        return A2AMeasurement(k, int(link), seconds, ideal, ideal / seconds)

    return measure, lambda k: nbytes * 8 / (real_bps / k)


def test_search_refuses_a_cpu_bound_dilation_and_names_the_smallest_that_passes():
    measure, ideal = _cpu_capped(real_bps=100e9, cpu_bps=2e9)
    check = search(1.0, measure, ideal)
    assert not check.passes and check.smallest_passing == 64  # 100 Gb/s / 64 < 2 Gb/s, / 32 is not
    with pytest.raises(ConfigError) as info:
        check.raise_if_refused()
    assert info.value.field == "dilation"
    assert "--dilation 64" in info.value.fix and "--skip-dilation-check" in info.value.fix
    assert "CPU" in info.value.problem


def test_search_accepts_a_link_bound_dilation_and_reports_its_efficiency():
    measure, ideal = _cpu_capped(real_bps=100e9, cpu_bps=2e9)
    check = search(100.0, measure, ideal)
    assert check.passes and [m.dilation for m in check.measurements] == [100.0, 200.0]
    assert check.link_efficiency == pytest.approx(0.6)
    check.raise_if_refused()  # no error
    assert check.to_dict()["link_efficiency"] == pytest.approx(0.6)


def test_search_stops_where_one_all_to_all_would_take_too_long():
    measure, ideal = _cpu_capped(real_bps=1e6, cpu_bps=1e3)  # never link-bound
    check = search(1.0, measure, ideal)
    assert check.smallest_passing is None
    with pytest.raises(ConfigError, match="no dilation up to"):
        check.raise_if_refused()


def test_ideal_time_counts_the_bytes_that_leave_a_host():
    spec = EmulateSpec(hosts=4, workers_per_host=2, link_bps=10**9)
    # each host sends 2 ranks x 4 MiB x 6/8 of it to other hosts
    assert ideal_a2a_s(spec, 4 << 20) == pytest.approx(2 * (4 << 20) * 6 / 8 * 8 / 1e9)


@needs_netns
@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_check_on_the_emulated_cluster_refuses_a_cpu_bound_link_and_accepts_a_slow_one():
    # 32 Gbit/s on this machine's cores: the CPU sets the speed, halving the link barely slows it
    too_fast = check_dilation("hosts=2,link=32gbit", 1.0)
    assert not too_fast.passes and too_fast.smallest_passing and too_fast.smallest_passing > 1
    assert too_fast.at(1.0).fraction < 0.95 * too_fast.at(2.0).fraction
    with pytest.raises(ConfigError, match=f"--dilation {too_fast.smallest_passing:g}"):
        too_fast.raise_if_refused()
    # 100 Mbit/s on 4 hosts: the link sets it, at 1 and at 2 alike (62% and 61% of it measured before)
    slow = check_dilation("hosts=4,link=100mbit", 1.0)
    assert slow.passes, slow.to_dict()
    assert 0.2 < slow.link_efficiency <= 1.05


@needs_netns
@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_on_the_paper_cluster_checks_its_dilation_and_reports_link_efficiency(tmp_path):
    trace = tmp_path / "trace.npz"
    synthetic_trace(4000, 2, 4, top_k=2, skew=1.3, seed=3).save(trace)
    res = run_lina(
        "train", "--cluster", "paper", "--routing-trace", str(trace), "--steps", "2", "--out", str(tmp_path / "run"),
        timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "4 hosts x 1 worker" in res.stderr
    assert "checking dilation 100" in res.stdout and "link efficiency" in res.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    check = summary["dilation_check"]
    assert check["passes"] and 0 < check["link_efficiency"] <= 1.05
    assert check["dilation"] >= 100  # the preset's, or the smallest passing one above it

"""``--cluster paper``: the paper's testbed fitted to this machine (workers, dilation, rates)."""

import pytest

from conftest import run_lina
from lina.cluster.presets import PRESETS, fit_preset, require_device_time, smallest_dilation
from lina.errors import ConfigError


def test_paper_cluster_on_two_cores_runs_one_worker_per_host_and_says_so():
    fitted = fit_preset("paper", cores=2)
    assert fitted.workers_per_host == 1 and fitted.workers == 4
    assert "4 hosts x 4 a100" in fitted.note and "4 hosts x 1 worker" in fitted.note
    spec = fitted.spec()
    # rates are the real cluster's divided by the dilation, within what tc shapes
    assert fitted.dilation == 100
    assert spec.link_bps == PRESETS["paper"].link_bps // 100 == 10**9
    assert spec.intra_bps == PRESETS["paper"].intra_bps // 100 == 24 * 10**9
    assert spec.hosts == 4 and spec.workers_per_host == 1


def test_paper_cluster_on_a_large_machine_keeps_four_workers_per_host():
    fitted = fit_preset("paper", cores=16)
    assert fitted.workers_per_host == 4 and fitted.workers == 16 and fitted.note is None


def test_dilation_is_the_smallest_one_tc_can_shape_or_a_larger_given_one():
    assert smallest_dilation(10**9) == 1 and smallest_dilation(40 * 10**9) == 2
    assert smallest_dilation(2400 * 10**9) == 100
    assert fit_preset("paper", cores=2, dilation=400).spec().link_bps == 250 * 10**6
    with pytest.raises(ConfigError) as info:
        fit_preset("paper", cores=2, dilation=10)
    assert info.value.field == "dilation" and "--dilation 100" in info.value.fix
    with pytest.raises(ConfigError, match="cluster"):
        fit_preset("testbed")
    with pytest.raises(ConfigError, match="device-time compute"):
        require_device_time("paper", "real")
    require_device_time("paper", None)  # the preset's device


@pytest.mark.slow  # starts the CLI in a subprocess (a second or more each)
def test_cluster_option_contradicting_the_layout_exits_2(tmp_path):
    res = run_lina("train", "--cluster", "paper", "--workers", "3", "--out", str(tmp_path), timeout=60)
    assert res.returncode == 2 and "invalid workers" in res.stderr and "--cluster paper sets it" in res.stderr
    res = run_lina(
        "bench", "train", "--cluster", "paper", "--link", "1gbit", "--json", str(tmp_path / "t.json"), timeout=60
    )
    assert res.returncode == 2 and "invalid link" in res.stderr
    assert not (tmp_path / "t.json").exists()

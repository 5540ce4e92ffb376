"""Emulated runs are quiet: hosts resolve each other's names (no c10d hostname warnings), one line
per host at start, no torchrun banner; --verbose forwards the launchers' own lines."""

import os
import re
import shutil

import pytest

from conftest import run_lina
from lina.cluster.hostnames import hosts_text


def test_hosts_file_names_every_host_in_both_address_forms():
    text = hosts_text([("lina-abc123-h0", "10.213.0.1"), ("lina-abc123-h1", "10.213.0.2")], "127.0.0.1\tlocalhost\n")
    lines = text.splitlines()
    assert lines[0] == "127.0.0.1\tlocalhost"
    assert "10.213.0.2\tlina-abc123-h1" in lines and "::ffff:10.213.0.2\tlina-abc123-h1" in lines


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tc") is None or shutil.which("ip") is None,
    reason="needs root, tc and ip to build the emulated cluster",
)
@pytest.mark.timeout(300)
def test_an_emulated_run_prints_no_launcher_noise(tmp_path, tiny_config):
    res = run_lina(
        "train",
        "--config",
        str(tiny_config),
        "--emulate",
        "hosts=2,workers_per_host=2,link=1gbit",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "run"),
        "--verbose",
        timeout=280,
    )
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    assert "hostname of the client socket cannot be retrieved" not in out
    assert "OMP_NUM_THREADS" not in out
    assert len(re.findall(r"^\[h\d\] host lina-[0-9a-f]{6}-h\d \(", res.stdout, re.M)) == 2

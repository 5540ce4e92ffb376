"""Emulated-cluster pieces that need no root: spec parsing, support checks, contention statistics."""

import math

import pytest

from lina.bench.contention import link_bound_s, summarize
from lina.cluster.emulate import EmulatedCluster, EmulateSpec, format_rate, parse_duration_us, parse_emulate, parse_rate
from lina.cluster.hostlaunch import _root_cause_rank
from lina.cluster.netns import Support, list_project_netns, new_prefix, require_support, run_prefix_of
from lina.cluster.spec import describe
from lina.errors import ConfigError, LinaError


def test_parse_emulate_full_and_none():
    spec = parse_emulate("hosts=4,link=200mbit,delay=50us,workers_per_host=2")
    assert spec == EmulateSpec(hosts=4, link_bps=200_000_000, delay_us=50.0, workers_per_host=2)
    assert spec.world_size == 8
    assert parse_emulate(str(spec)) == spec
    assert parse_emulate("none") is None
    assert parse_emulate(" None ") is None
    assert parse_emulate("hosts=2,workers-per-host=3,queue=5ms") == EmulateSpec(
        hosts=2, workers_per_host=3, queue_ms=5.0
    )
    fifo = parse_emulate("link=1gbit,share=fifo")
    assert fifo.share == "fifo" and parse_emulate(str(fifo)) == fifo
    assert EmulateSpec().share == "peer" and "share" not in str(EmulateSpec())


def test_intra_host_link_key_is_off_by_default_and_divided_by_the_dilation():
    assert EmulateSpec().intra_bps == 0 and parse_emulate("hosts=2").intra == "off"
    assert "intra" not in str(EmulateSpec())
    spec = parse_emulate("hosts=4,link=100gbit,intra=2400gbit,workers_per_host=2", dilation=100)
    assert spec.link_bps == 10**9 and spec.intra_bps == 24 * 10**9
    assert parse_emulate(str(spec)) == spec  # its text names the emulated rates
    assert parse_emulate("intra=off").intra_bps == 0
    line = describe(spec, dilation=100)
    assert "host link 100gbit (emulated 1gbit)" in line and "intra-host link 2400gbit (emulated 24gbit)" in line
    assert "intra-host link off" in describe(EmulateSpec())


@pytest.mark.parametrize(
    "text,bps",
    [("500kbit", 500_000), ("200mbit", 200_000_000), ("1gbit", 10**9), ("1.5gbit", 1_500_000_000), ("64000bit", 64000)],
)
def test_rates(text, bps):
    assert parse_rate(text) == bps
    assert parse_rate(format_rate(bps)) == bps


def test_durations():
    assert parse_duration_us("50us") == 50.0
    assert parse_duration_us("1.5ms") == 1500.0
    assert parse_duration_us("0") == 0.0
    with pytest.raises(ConfigError):
        parse_duration_us("50")


@pytest.mark.parametrize(
    "text,field",
    [
        ("hosts=1", "emulate.hosts"),
        ("hosts=x", "emulate.hosts"),
        ("link=200mbps", "emulate.link"),
        ("link=10bit", "emulate.link"),
        ("link=40gbit", "emulate.link"),
        ("delay=-3us", "emulate.delay"),
        ("workers_per_host=0", "emulate.workers_per_host"),
        ("share=fair", "emulate.share"),
        ("queue=0.1ms", "emulate.queue"),
        ("intra=40gbit", "emulate.intra"),
        ("intra=fast", "emulate.intra"),
        ("speed=3", "emulate"),
        ("hosts4", "emulate"),
    ],
)
def test_bad_specs_name_the_field(text, field):
    with pytest.raises(ConfigError) as info:
        parse_emulate(text)
    assert info.value.field == field
    assert info.value.fix


def test_prefixes():
    p = new_prefix()
    assert run_prefix_of(p + "-h12") == p
    assert run_prefix_of("lina-xyz-h0") is None
    assert run_prefix_of("eth0") is None
    with pytest.raises(ConfigError):
        EmulatedCluster(EmulateSpec(), prefix="nope")


def test_missing_root_gives_clear_error_and_builds_nothing():
    lacking = Support(net_admin=False, ip_binary="/usr/sbin/ip", netns=True)
    cluster = EmulatedCluster(EmulateSpec(hosts=2), support=lacking)
    before = list_project_netns(cluster.prefix)
    with pytest.raises(LinaError) as info:
        with cluster:
            pytest.fail("the cluster must not come up without privileges")
    msg = str(info.value)
    assert "root" in msg and "CAP_NET_ADMIN" in msg
    assert "--emulate none" in msg
    assert list_project_netns(cluster.prefix) == before == []


def test_missing_tools_are_each_named():
    with pytest.raises(LinaError) as info:
        require_support(Support(net_admin=True, ip_binary=None, netns=False), alternative="--link none")
    msg = str(info.value)
    assert "iproute2" in msg and "CONFIG_NET_NS" in msg and "--link none" in msg
    assert require_support(Support(net_admin=True, ip_binary="/sbin/ip", netns=True)).net_admin
    with pytest.raises(LinaError, match="no loopback mode"):
        require_support(Support(net_admin=False, ip_binary="/sbin/ip", netns=True), alternative=None)


def test_summarize_takes_slowest_rank_per_pair():
    alone = [[0.010, 0.020, 0.010], [0.012, 0.010, 0.011]]  # [rank][pair]
    contended = [[0.030, 0.020, 0.022], [0.024, 0.050, 0.011]]
    allreduce = [[0.1, 0.1, 0.1], [0.2, 0.1, 0.1]]
    out = summarize(alone, contended, allreduce)
    assert out["samples"]["alone_s"] == [0.012, 0.020, 0.011]
    assert out["samples"]["slowdown"] == pytest.approx([0.030 / 0.012, 0.050 / 0.020, 0.022 / 0.011])
    assert out["slowdown"]["median"] == pytest.approx(2.5)
    assert out["slowdown"]["max"] == pytest.approx(2.5)
    assert out["slowdown"]["min"] == pytest.approx(2.0)
    assert out["ratio_of_medians"] == pytest.approx(0.030 / 0.012)
    assert out["allreduce_s"]["max"] == 0.2


def test_summarize_skips_missing_pairs_and_rejects_empty():
    out = summarize([[0.01, math.nan]], [[0.02, 0.03]], [[0.1, 0.1]])
    assert out["samples"]["slowdown"] == [2.0]
    with pytest.raises(LinaError):
        summarize([[math.nan]], [[math.nan]], [[math.nan]])


def test_link_bound():
    # 1 MiB per rank over 4 hosts: 3/4 of it leaves each host; at 200 Mbit/s that is ~31.5 ms
    assert link_bound_s(2**20, 4, 200_000_000) == pytest.approx(2**20 * 0.75 * 8 / 2e8)


def test_root_cause_rank_is_read_from_the_root_cause_block():
    lines = [
        "Failures:", "[1]:", "  rank      : 2 (local_rank: 0)",
        "Root Cause (first observed failure):", "[0]:", "  time      : now", "  rank      : 3 (local_rank: 1)",
    ]  # fmt: skip
    assert _root_cause_rank(lines) == (3, 1)
    assert _root_cause_rank(["nothing here"]) is None

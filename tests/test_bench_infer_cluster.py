"""``lina bench infer --cluster paper``: the paper's testbed fitted to this machine, resolved and
checked before any process starts."""

import argparse
import json
import os
import shutil

import pytest

from conftest import run_lina
from lina.bench import infer
from lina.bench.infer_cluster import cluster_lines, cluster_regime, resolve_cluster
from lina.cluster.spec import format_rate
from lina.errors import ConfigError

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tc") is None, reason="needs root and tc for the emulated cluster"
)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    infer.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_paper_cluster_on_two_cores_is_four_hosts_of_one_worker_in_a100_time():
    args = _args("--cluster", "paper")
    fitted = resolve_cluster(args, cores=2)
    assert (args.hosts, args.workers_per_host) == (4, 1)
    assert args.compute == "a100" and args.link == "100gbit"
    assert args.dilation == fitted.dilation and 100e9 / args.dilation <= 32e9  # within what tc shapes
    assert args.dilation_chosen_by_cluster and args.intra_bps == 0  # one worker per host: no intra traffic
    regime = cluster_regime(fitted, args.dilation)
    assert regime["emulated"] == "4 hosts x 1 worker" and regime["real"] == "4 hosts x 4 a100"
    assert regime["emulated_link"] == format_rate(int(100e9 / args.dilation))
    assert "4 hosts x 1 worker" in regime["scaled_down"]
    text = "\n".join(cluster_lines(regime))
    assert "host link 100gbit (emulated" in text and "NVLink" in text
    assert 8 % (args.hosts * args.workers_per_host) == 0  # the traces' 8 experts: 2 per worker


def test_paper_cluster_with_more_cores_keeps_the_intra_link_and_a_given_dilation():
    args = _args("--cluster", "paper", "--dilation", "200")
    resolve_cluster(args, cores=8)
    assert (args.hosts, args.workers_per_host) == (4, 2) and args.dilation == 200
    assert not args.dilation_chosen_by_cluster and args.intra_bps == 2400 * 10**9
    assert infer._emulate_spec(args).intra_bps == 12 * 10**9  # 2400 Gb/s / 200


def test_without_cluster_the_defaults_hold():
    args = _args()
    assert resolve_cluster(args) is None
    assert (args.hosts, args.workers_per_host, args.link, args.compute, args.dilation) == (4, 2, "100mbit", "real", 1.0)


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--compute", "real"], "compute"),
        (["--link", "1gbit"], "link"),
        (["--hosts", "2"], "hosts"),
        (["--workers-per-host", "2"], "workers-per-host"),
        (["--dilation", "2"], "dilation"),  # 100 Gb/s / 2 is beyond tc
    ],
)
def test_contradicting_options_are_refused(argv, field):
    with pytest.raises(ConfigError) as err:
        infer.check_compute(_args("--cluster", "paper", *argv))
    assert err.value.field == field


@pytest.mark.slow  # starts the CLI in a subprocess
def test_cluster_with_real_compute_exits_2_before_starting(tmp_path):
    res = run_lina(
        "bench", "infer", "--cluster", "paper", "--compute", "real", "--json", str(tmp_path / "i.json"), timeout=60
    )
    assert res.returncode == 2 and "invalid compute" in res.stderr and "Fix:" in res.stderr
    assert not (tmp_path / "i.json").exists()


@needs_netns
@pytest.mark.netns
@pytest.mark.slow
def test_bench_infer_quick_on_the_paper_cluster(tmp_path):
    from lina.data.routing_trace import synthetic_trace

    out = tmp_path / "infer.json"
    trace = tmp_path / "trace.npz"
    synthetic_trace(3000, 8, 8, top_k=2, skew=1.5, seed=3).save(trace)  # 8 experts, 2 per worker of 4 x 1
    res = run_lina(
        "bench", "infer", "--quick", "--cluster", "paper", "--routing-trace", str(trace), "--json", str(out),
        timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    regime = json.loads(out.read_text())["regime"]
    assert regime["compute"] == "a100" and regime["link"] == "100gbit"
    assert regime["cluster"]["name"] == "paper" and regime["experts_per_worker"] * 4 == 8
    assert regime["emulated_link"] == format_rate(int(100e9 / regime["dilation"]) // 1000 * 1000)
    assert "host link 100gbit (emulated" in res.stdout
    # device time: the expert FFNs were charged, and latencies are reported in real-cluster units
    k = regime["dilation"]
    assert 0 < regime["link_efficiency"] <= 1.05
    assert f"latencies in real-cluster ms: measured / {k:g}" in res.stdout
    data = json.loads(out.read_text())
    run = data["runs"][0]
    assert run["device_time"]["device"] == "a100-80gb-bf16" and run["device_time"]["ops_charged"] > 0
    raw = json.loads((tmp_path / "trace" / "result.json").read_text())
    for name in ("static", "eplb", "lina", "oracle"):
        p = data["policies"][name]
        assert 0 < p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"]
        measured = sorted(b["latency_s"] * 1e3 for b in raw[name]["batches"])
        assert p["min_ms"] == pytest.approx(measured[0] / k)

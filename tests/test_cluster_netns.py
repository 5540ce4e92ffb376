"""The emulated cluster really limits links (measured with plain TCP) and always cleans up.

Needs root and tc (CI runs as root); skipped otherwise.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lina.cli import main as lina_main
from lina.cluster import netns
from lina.cluster.emulate import EmulatedCluster, EmulateSpec, survey

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0 or bool(netns.probe_support().missing()) or shutil.which("tc") is None,
        reason="needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), tc and ip to build network namespaces",
    ),
]

# A plain TCP sender/receiver. The receiver counts bytes from the first one to EOF, so the
# data a sender leaves in its socket buffer is still timed at the rate it crossed the link.
PROBE = textwrap.dedent(
    """
    import json, socket, sys, time
    mode, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "recv":
        srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((ip, port)); srv.listen(1); print("ready", flush=True)
        conn, _ = srv.accept(); n = 0; t0 = None
        while True:
            b = conn.recv(1 << 20)
            if not b:
                break
            if t0 is None:
                t0 = time.perf_counter()
            n += len(b)
        print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t0}), flush=True)
    else:
        conn = socket.create_connection((ip, port)); buf = b"x" * (1 << 16)
        end = time.perf_counter() + float(sys.argv[4])
        while time.perf_counter() < end:
            conn.sendall(buf)
        conn.close()
    """
)

PREFIXES: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind():
    """After this file: none of its namespaces, and no project link in the root namespace."""
    yield
    leftover = [n for p in PREFIXES for n in netns.list_project_netns(p + "-")]
    assert leftover == []
    assert [link for p in PREFIXES for link in netns.root_project_links(p)] == []


def cluster(**kw) -> EmulatedCluster:
    c = EmulatedCluster(EmulateSpec(**kw))
    PREFIXES.append(c.prefix)
    return c


def start_receiver(c: EmulatedCluster, h: int, ip: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        c.wrap(h, [sys.executable, "-c", PROBE, "recv", ip, str(port)]), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def start_sender(c: EmulatedCluster, h: int, ip: str, port: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(c.wrap(h, [sys.executable, "-c", PROBE, "send", ip, str(port), str(seconds)]))


def finish(receiver: subprocess.Popen, sender: subprocess.Popen) -> float:
    """Bits per second the receiver saw."""
    assert sender.wait(timeout=30) == 0
    out, _ = receiver.communicate(timeout=30)
    result = json.loads(out.strip().splitlines()[-1])
    return result["bytes"] * 8 / result["seconds"]


def measure(c: EmulatedCluster, src: int, dst: int, seconds: float, port: int = 5001) -> float:
    receiver = start_receiver(c, dst, c.hosts[dst].ip, port)
    return finish(receiver, start_sender(c, src, c.hosts[dst].ip, port, seconds))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rate_mbit,share", [(50, "peer"), (200, "peer"), (200, "fifo")])
def test_point_to_point_throughput_matches_link_rate(rate_mbit, share):
    with cluster(hosts=2, link_bps=rate_mbit * 10**6, share=share) as c:
        # both ends of each link carry the configured token bucket
        for h in c.hosts:
            assert netns.read_egress_rate(h.netns, h.ifname) == rate_mbit * 10**6
            assert netns.read_egress_rate(c.switch_netns, netns.port_ifname(h.index)) == rate_mbit * 10**6
        forward = measure(c, 0, 1, 1.5)
        backward = measure(c, 1, 0, 1.0, port=5002)
        counters = c.link_counters()
    # the data crossed host 0's upload and host 1's download buckets (>= 1.5 s at ~the rate)
    for sent in (counters[0]["up"]["bytes"], counters[1]["down"]["bytes"]):
        assert sent > 0.8 * 1.5 * rate_mbit * 1e6 / 8
    for bps in (forward, backward):
        assert abs(bps / (rate_mbit * 1e6) - 1) < 0.15, f"{bps / 1e6:.1f} Mbit/s on a {rate_mbit} Mbit/s link"


@pytest.mark.timeout(60)
def test_intra_host_link_limits_traffic_between_workers_of_one_host():
    intra, link = 80 * 10**6, 400 * 10**6
    with cluster(hosts=2, link_bps=link, intra_bps=intra) as c:
        assert netns.read_egress_rate(c.hosts[0].netns, "lo") == intra
        before = c.link_counters()[0]["up"]["bytes"]
        receiver = start_receiver(c, 0, c.hosts[0].ip, 5001)  # both ends on host 0: over its loopback
        sender = start_sender(c, 0, c.hosts[0].ip, 5001, 1.5)
        assert sender.wait(timeout=30) == 0
        out, _ = receiver.communicate(timeout=30)
        moved = json.loads(out.strip().splitlines()[-1])
        crossed_host_link = c.link_counters()[0]["up"]["bytes"] - before
    # N bytes took at least N * 8 / rate (less one 128 KiB token bucket), and the rate was reached
    floor_s = (moved["bytes"] - 128 * 1024) * 8 / intra
    assert moved["seconds"] >= 0.97 * floor_s, (
        f"{moved['bytes']} B in {moved['seconds']:.2f} s on {intra / 1e6:.0f} Mbit/s"
    )
    assert moved["bytes"] * 8 / moved["seconds"] > 0.8 * intra
    assert crossed_host_link < 100_000  # the host's own link did not carry it


@pytest.mark.timeout(60)
def test_two_flows_leaving_one_host_share_its_link():
    rate = 100 * 10**6
    with cluster(hosts=3, link_bps=rate) as c:  # share=peer: round-robin between peer hosts
        receivers = [start_receiver(c, h, c.hosts[h].ip, 5001) for h in (1, 2)]
        senders = [start_sender(c, 0, c.hosts[h].ip, 5001, 2.0) for h in (1, 2)]
        flows = [finish(r, s) for r, s in zip(receivers, senders)]
    assert abs(sum(flows) / rate - 1) < 0.15, [f / 1e6 for f in flows]
    for f in flows:
        assert 0.4 < f / rate < 0.6, f"one of two flows got {f / 1e6:.1f} of {rate / 1e6:.0f} Mbit/s"


@pytest.mark.timeout(60)
def test_two_flows_into_one_host_share_its_download():
    rate = 100 * 10**6
    with cluster(hosts=3, link_bps=rate) as c:
        receivers = [start_receiver(c, 0, c.hosts[0].ip, port) for port in (5001, 5002)]
        senders = [start_sender(c, h, c.hosts[0].ip, port, 1.5) for h, port in ((1, 5001), (2, 5002))]
        flows = [finish(r, s) for r, s in zip(receivers, senders)]
    assert abs(sum(flows) / rate - 1) < 0.15, [f / 1e6 for f in flows]
    for f in flows:
        assert 0.4 < f / rate < 0.6, f"one of two flows got {f / 1e6:.1f} of {rate / 1e6:.0f} Mbit/s"


@pytest.mark.timeout(60)
def test_intra_host_traffic_is_not_limited():
    rate = 50 * 10**6
    with cluster(hosts=2, link_bps=rate) as c:
        local = measure(c, 0, 0, 0.5)
    assert local > 5 * rate, f"host-local traffic ran at {local / 1e6:.0f} Mbit/s"


@pytest.mark.timeout(60)
def test_teardown_on_exception_kills_processes_inside_and_restores_signals():
    before = signal.getsignal(signal.SIGTERM)
    c = cluster(hosts=2, link_bps=10**8)
    with pytest.raises(RuntimeError, match="boom"):
        with c:
            assert signal.getsignal(signal.SIGTERM) != before
            sleeper = subprocess.Popen(c.wrap(1, ["sleep", "60"]))
            time.sleep(0.2)
            assert sleeper.pid in netns.pids_in_netns(c.hosts[1].netns)
            raise RuntimeError("boom")
    assert sleeper.wait(timeout=10) != 0
    assert netns.list_project_netns(c.prefix + "-") == []
    assert signal.getsignal(signal.SIGTERM) == before
    assert not [r for r in survey() if r.prefix == c.prefix]


HOLDER = textwrap.dedent(
    """
    import os, signal, sys, time
    from lina.cluster.emulate import EmulatedCluster, EmulateSpec
    with EmulatedCluster(EmulateSpec(hosts=2, link_bps=10**8)) as c:
        print(c.prefix, flush=True)
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
    """
)


@pytest.mark.timeout(60)
def test_sigterm_to_the_owner_removes_the_cluster():
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, "wait"], stdout=subprocess.PIPE, text=True)
    prefix = proc.stdout.readline().strip()
    PREFIXES.append(prefix)
    assert len(netns.list_project_netns(prefix + "-")) == 3
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert netns.list_project_netns(prefix + "-") == []
    assert not [r for r in survey() if r.prefix == prefix]


@pytest.mark.timeout(60)
def test_down_all_removes_a_killed_runs_cluster_but_not_a_live_one(capsys):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, "kill"], stdout=subprocess.PIPE, text=True)
    stale = proc.stdout.readline().strip()
    PREFIXES.append(stale)
    assert proc.wait(timeout=20) == -signal.SIGKILL
    assert len(netns.list_project_netns(stale + "-")) == 3  # SIGKILL leaves it behind ...
    assert [r.kind for r in survey() if r.prefix == stale] == ["stale"]
    with cluster(hosts=2, link_bps=10**8) as live:
        assert lina_main(["cluster", "down", "--all"]) == 0
        out = capsys.readouterr().out
        assert f"removed {stale} (stale)" in out
        assert f"kept {live.prefix}" in out
        assert netns.list_project_netns(stale + "-") == []  # ... and down --all removes it
        assert len(netns.list_project_netns(live.prefix + "-")) == 3
    assert netns.list_project_netns(live.prefix + "-") == []


@pytest.mark.timeout(60)
def test_cli_up_status_down(capsys):
    assert lina_main(["cluster", "up", "--hosts", "2", "--link", "100mbit"]) == 0
    out = capsys.readouterr().out
    prefix = out.split()[1]
    PREFIXES.append(prefix)
    assert netns.run_prefix_of(prefix + "-h0") == prefix
    assert f"{prefix}-h1" in out and "10.213.0.2" in out
    assert len(netns.list_project_netns(prefix + "-")) == 3  # stays up after the command returns
    assert lina_main(["cluster", "status"]) == 0
    status = capsys.readouterr().out
    assert f"{prefix}  detached" in status and "shaped to 100mbit" in status
    assert lina_main(["cluster", "down", prefix]) == 0
    assert f"removed {prefix}" in capsys.readouterr().out
    assert netns.list_project_netns(prefix + "-") == []

"""run_on_cluster: one torchrun agent per emulated host; failures are named and nothing is left running.

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

from lina.cluster import netns
from lina.cluster.emulate import EmulatedCluster, EmulateSpec
from lina.cluster.hostlaunch import run_on_cluster
from lina.errors import LinaError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0 or bool(netns.probe_support().missing()) or shutil.which("tc") is None,
        reason="needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), tc and ip to build network namespaces",
    ),
]

WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    import torch, torch.distributed as dist
    out_dir, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "crash" and rank == world - 1:
        raise RuntimeError(f"deliberate crash on rank {rank}")
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    st = os.stat("/proc/self/ns/net")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "world": world, "local_rank": int(os.environ["LOCAL_RANK"]),
                   "ifname": os.environ["GLOO_SOCKET_IFNAME"], "master": os.environ["MASTER_ADDR"],
                   "netns": [st.st_dev, st.st_ino], "pid": os.getpid(), "sum": total.item()}, fh)
    if mode in ("crash", "hang"):
        time.sleep(120)  # they hang here until the launcher stops them
    dist.destroy_process_group()
    """
)


@pytest.fixture
def worker_module(tmp_path, monkeypatch):
    (tmp_path / "lina_test_cluster_worker.py").write_text(WORKER)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = tmp_path / "out"
    out.mkdir()
    return "lina_test_cluster_worker", out


def _netns_key(name: str) -> list[int]:
    st = os.stat(netns.NETNS_DIR / name)
    return [st.st_dev, st.st_ino]


@pytest.mark.timeout(120)
def test_workers_run_inside_their_hosts(worker_module, capsys):
    module, out = worker_module
    with EmulatedCluster(EmulateSpec(hosts=2, workers_per_host=2, link_bps=200 * 10**6)) as c:
        assert run_on_cluster(c, module, [str(out), "ok"], 2, timeout_s=90) == 0
        keys = [_netns_key(h.netns) for h in c.hosts]
        records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
        assert not any(netns.pids_in_netns(h.netns) for h in c.hosts)
    for r, rec in enumerate(records):
        host = r // 2
        assert rec["world"] == 4 and rec["sum"] == 10.0
        assert rec["local_rank"] == r % 2
        assert rec["netns"] == keys[host], f"rank {r} did not run in host {host}'s namespace"
        assert rec["ifname"] == netns.host_ifname(host)
        assert rec["master"] == netns.host_ip(0)
    assert "[h1]" in capsys.readouterr().out  # worker output is forwarded per host


@pytest.mark.timeout(120)
def test_a_crashed_worker_stops_everyone_and_is_named(worker_module):
    module, out = worker_module
    with EmulatedCluster(EmulateSpec(hosts=2, link_bps=200 * 10**6)) as c:
        started = time.monotonic()
        with pytest.raises(LinaError) as info:
            run_on_cluster(c, module, [str(out), "crash"], 1, timeout_s=90, grace_s=5)
        elapsed = time.monotonic() - started
        assert not any(netns.pids_in_netns(h.netns) for h in c.hosts), "a worker outlived the failure"
    msg = str(info.value)
    assert msg.startswith("host 1 (rank 1) failed with exit code 1, first failed worker: global rank 1"), msg
    assert "RuntimeError: deliberate crash on rank 1" in msg
    assert elapsed < 75, f"took {elapsed:.0f}s to stop after a crash"
    assert not (out / "rank1.json").exists()


@pytest.mark.timeout(60)
def test_timeout_stops_everything(worker_module):
    module, out = worker_module
    with EmulatedCluster(EmulateSpec(hosts=2, link_bps=200 * 10**6)) as c:
        with pytest.raises(LinaError, match="did not finish within 1s"):
            run_on_cluster(c, "lina_test_cluster_worker", [str(out), "crash"], 1, timeout_s=1, grace_s=3)
        assert not any(netns.pids_in_netns(h.netns) for h in c.hosts)


OWNER = textwrap.dedent(
    """
    import sys
    from lina.cluster.emulate import EmulatedCluster, EmulateSpec
    from lina.cluster.hostlaunch import run_on_cluster
    with EmulatedCluster(EmulateSpec(hosts=2, link_bps=10**8)) as c:
        print(c.prefix, flush=True)
        run_on_cluster(c, "lina_test_cluster_worker", [sys.argv[1], "hang"], 1, stream=sys.stderr)
    """
)


@pytest.mark.timeout(90)
def test_sigterm_to_the_launcher_leaves_no_worker_and_no_cluster(worker_module):
    module, out = worker_module
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(out)], stdout=subprocess.PIPE, text=True, stderr=subprocess.DEVNULL
    )
    prefix = owner.stdout.readline().strip()
    deadline = time.monotonic() + 60
    while len(list(out.glob("rank*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = [json.loads(p.read_text())["pid"] for p in out.glob("rank*.json")]
    assert len(pids) == 2, "workers did not start"
    owner.send_signal(signal.SIGTERM)
    assert owner.wait(timeout=30) == 128 + signal.SIGTERM
    for pid in pids:
        assert not netns._running(pid), f"worker {pid} outlived its launcher"
    assert netns.list_project_netns(prefix + "-") == []

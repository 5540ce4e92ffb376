"""A worker's own error reaches the user: message, rank, host and exit code, no traceback, and
nothing is left running (local launcher and emulated cluster)."""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import lina_cmd, run_lina
from lina.cluster.failures import WorkerFailed, WorkerFailure, parse_error_data, root_cause


def test_both_error_file_layouts_are_read():
    nested = {
        "message": {
            "message": "ConfigError: invalid workers: 3. Fix: use 2",
            "extraInfo": {"py_callstack": "Traceback ...", "timestamp": "17"},
        }
    }
    assert parse_error_data(nested) == ("ConfigError: invalid workers: 3. Fix: use 2", "Traceback ...", 17)
    assert parse_error_data({"message": "plain", "timestamp": 5}) == ("plain", "", 5)
    assert parse_error_data("not a dict") == ("", "", 0)
    assert parse_error_data({"message": "<NONE>"}) == ("", "", 0)


def test_lina_errors_keep_their_exit_code_and_lose_their_class_name():
    config = WorkerFailure(1, "hostA", 1, "ConfigError: invalid workers: 3. Fix: use 2", "Traceback (most...)", 10)
    err = WorkerFailed(config)
    assert err.exit_code == 2
    assert str(err).startswith("rank 1 on host hostA failed (exit code 1): invalid workers: 3. Fix: use 2")
    assert "Traceback" not in str(err) and "ConfigError" not in str(err)
    assert "Traceback" in str(WorkerFailed(config, verbose=True))
    bug = WorkerFailed(WorkerFailure(0, "hostA", 1, "RuntimeError: boom"))
    assert bug.exit_code == 1 and "RuntimeError: boom" in str(bug) and "--verbose" in str(bug)


def test_the_root_cause_is_not_a_lost_peer():
    lost = WorkerFailure(0, "h0", 1, "RuntimeError: Connection closed by peer [10.0.0.2]:1234", timestamp=1)
    origin = WorkerFailure(1, "h1", 1, "ValueError: bad shape", timestamp=2)
    killed = WorkerFailure(2, "h1", -9)
    assert root_cause([lost, killed, origin]) is origin
    assert root_cause([lost, killed]) is lost


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return kids + [d for k in kids for d in _descendants(k)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="ignore")
    except OSError:
        return ""


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "zombie" not in next(line for line in status.splitlines() if line.startswith("State:"))


@pytest.mark.slow
@pytest.mark.parametrize("kind,code", [("config", 2), ("runtime", 1)])
def test_a_raising_worker_is_reported_with_its_message_rank_and_code(kind, code):
    from lina.cluster.launch import launch_local
    from lina.testing.failing import fail_on_rank

    started = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        launch_local(fail_on_rank, (1, kind, "deliberate failure 42"), 2)
    assert time.monotonic() - started < 25, "the sleeping rank was not stopped"
    msg = str(info.value)
    assert re.match(r"rank 1 on host \S+ failed \(exit code 1\): ", msg), msg
    assert "deliberate failure 42" in msg and "Traceback" not in msg
    assert info.value.exit_code == code
    assert info.value.failure.rank == 1
    workers = [p for p in _descendants(os.getpid()) if "spawn" in _cmdline(p)]
    assert not [p for p in workers if _running(p)], "a worker outlived the failure"


@pytest.mark.slow
def test_an_error_a_worker_raises_on_purpose_reaches_the_user_as_its_message(tmp_path, tiny_config):
    corpus = tmp_path / "short.txt"
    corpus.write_text("too short for one sequence")  # every worker's data loader refuses it
    res = run_lina(
        "train", "--config", str(tiny_config), "--workers", "2", "--corpus", str(corpus), "--out", str(tmp_path / "run")
    )
    assert res.returncode == 2, res.stderr  # a ConfigError keeps its exit code
    assert "Traceback" not in res.stderr and "splitlines" not in res.stderr
    found = re.search(r"rank \d on host \S+ failed \(exit code 1\): invalid corpus: only \d+ tokens", res.stderr)
    assert found, res.stderr
    assert "Fix:" in res.stderr


needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tc") is None or shutil.which("ip") is None,
    reason="needs root, tc and ip to build the emulated cluster",
)


@pytest.mark.slow
@pytest.mark.netns
@needs_netns
@pytest.mark.timeout(240)
def test_sigint_during_an_emulated_run_leaves_nothing(tmp_path, tiny_config):
    from lina.cluster import netns

    out = tmp_path / "run"
    proc = subprocess.Popen(
        lina_cmd(
            "train",
            "--config",
            str(tiny_config),
            "--emulate",
            "hosts=2,link=1gbit",
            "--steps",
            "100000",
            "--out",
            str(out),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    namespaces: list[str] = []
    deadline = time.time() + 150
    while time.time() < deadline:
        line = proc.stdout.readline()
        namespaces += re.findall(r"namespace (lina-[0-9a-f]{6}-h\d+)\)", line)
        if line.startswith("[h0] step") or not line:
            break
    assert len(namespaces) == 2, "the hosts did not announce themselves"
    prefix = namespaces[0].rsplit("-", 1)[0]
    everyone = _descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    time.sleep(1)
    assert netns.list_project_netns(prefix + "-") == [], "a namespace was left behind"
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert prefix not in links and not re.search(r"\bveth-h\d+@", links)
    assert not [p for p in everyone if _running(p)], "processes left behind"
    assert not [p for p in Path("/etc/netns").glob(prefix + "-*")] if Path("/etc/netns").exists() else True

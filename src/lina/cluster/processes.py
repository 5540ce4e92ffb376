"""Running commands inside network namespaces, and finding and stopping the processes there."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

NETNS_DIR = Path("/run/netns")  # where named network namespaces live (iproute2's convention)


def exec_argv(ns: str, argv: list[str]) -> list[str]:
    """``argv`` run inside namespace ``ns`` (``ip netns exec`` execs it: same pid, signals reach it)."""
    return [shutil.which("ip") or "ip", "netns", "exec", ns, *argv]


def pids_in_netns(name: str) -> list[int]:
    """Processes whose network namespace is ``name`` (matched by nsfs inode)."""
    try:
        st = os.stat(NETNS_DIR / name)
    except FileNotFoundError:
        return []
    key = (st.st_dev, st.st_ino)
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            pst = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (pst.st_dev, pst.st_ino) == key and int(entry) != os.getpid():
            out.append(int(entry))
    return out


def kill_netns_processes(names: list[str], grace_s: float = 3.0) -> list[int]:
    """SIGTERM every process inside the namespaces ``names``, SIGKILL those alive after ``grace_s``.

    Returns the pids that were signalled.
    """
    pids = [pid for name in names for pid in pids_in_netns(name)]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if _running(pid)]
    for pid in alive:
        _signal(pid, signal.SIGKILL)
    return pids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def process_start_time(pid: int) -> int | None:
    """Kernel start time (clock ticks since boot) of ``pid``, to tell a live owner from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])

"""The record of emulated clusters on this machine: state files, surveys, clean-up.

A cluster writes a state file when it comes up (see :mod:`lina.cluster.lifecycle`) and removes it
when it goes down. A SIGKILLed owner leaves its state file behind with a dead owner pid, which is
how ``lina cluster down --all`` tells stale clusters from live ones; :func:`teardown` removes a
cluster's processes, namespaces and stray links whoever owned it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lina.cluster import netns, processes
from lina.errors import LinaError


def state_dir() -> Path:
    """Where cluster state files live: /run/lina/clusters when writable, else /tmp/lina/clusters."""
    for base in (Path("/run/lina"), Path("/tmp/lina")):
        try:
            (base / "clusters").mkdir(parents=True, exist_ok=True)
            if os.access(base / "clusters", os.W_OK):
                return base / "clusters"
        except OSError:
            continue
    raise LinaError("cannot write cluster state under /run/lina or /tmp/lina; check permissions")


def read_states(directory: Path | None = None) -> list[dict]:
    """Every readable cluster state file (one dict per cluster)."""
    directory = state_dir() if directory is None else directory
    out = []
    for path in sorted(directory.glob("lina-*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        state["state_file"] = str(path)
        out.append(state)
    return out


def owner_alive(state: dict) -> bool:
    """True when the process that owns a cluster is still running (same pid and start time)."""
    pid = state.get("owner_pid")
    if pid is None:
        return False
    return processes.process_start_time(pid) == state.get("owner_start")


def teardown(prefix: str, hosts: int | None = None) -> list[str]:
    """Remove everything of run ``prefix``: processes inside, namespaces, stray root links.

    Args:
        prefix: the run prefix, e.g. ``lina-3fa9c1``.
        hosts: when known, the host count (the namespaces are also found by listing).
    Returns:
        the namespaces deleted.
    """
    names = set(netns.list_project_netns(prefix + "-"))
    if hosts is not None:
        names |= {netns.host_netns(prefix, h) for h in range(hosts)} | {netns.switch_netns(prefix)}
    present = [n for n in sorted(names) if (netns.NETNS_DIR / n).exists()]
    processes.kill_netns_processes(present)
    deleted = [n for n in present if netns.delete_netns(n)]
    for link in netns.root_project_links(prefix + "-"):
        netns.delete_root_link(link)
    return deleted


@dataclass(frozen=True)
class ClusterRecord:
    """One cluster found on this machine (by state file, namespaces, or both).

    ``kind`` is ``running`` (its owner process is alive), ``detached`` (left up by
    ``lina cluster up``) or ``stale`` (owner gone, or namespaces without a state file).
    """

    prefix: str
    kind: str
    namespaces: tuple[str, ...]
    state: dict | None


def survey() -> list[ClusterRecord]:
    """Every project cluster on this machine, from state files and ``lina-*`` namespaces."""
    states = {s.get("prefix"): s for s in read_states()}
    by_prefix: dict[str, list[str]] = {}
    for name in netns.list_project_netns():
        prefix = netns.run_prefix_of(name)
        if prefix is not None:
            by_prefix.setdefault(prefix, []).append(name)
    for link in netns.root_project_links():
        prefix = netns.run_prefix_of(link)
        if prefix is not None:
            by_prefix.setdefault(prefix, [])
    out = []
    for prefix in sorted(set(states) | set(by_prefix)):
        if prefix is None:
            continue
        state = states.get(prefix)
        if state is None:
            kind = "stale"
        elif state.get("detached"):
            kind = "detached"
        else:
            kind = "running" if owner_alive(state) else "stale"
        out.append(ClusterRecord(prefix, kind, tuple(by_prefix.get(prefix, ())), state))
    return out


def remove_cluster(record: ClusterRecord) -> list[str]:
    """Tear down one surveyed cluster and delete its state file; returns the namespaces deleted."""
    hosts = len(record.state["hosts"]) if record.state and "hosts" in record.state else None
    deleted = teardown(record.prefix, hosts)
    if record.state and record.state.get("state_file"):
        Path(record.state["state_file"]).unlink(missing_ok=True)
    return deleted

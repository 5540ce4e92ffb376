"""Run a module on every emulated host: one ``torch.distributed.run`` agent per host namespace.

Agent h runs inside host h's namespace as node ``h`` of ``H`` with ``W`` workers
(``--nnodes H --node-rank h --nproc-per-node W``), static rendezvous at host 0's address
on a port that is free there. Workers get RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT from torchrun as usual, and ``GLOO_SOCKET_IFNAME`` names their host's veth.
Their output is forwarded line by line with a ``[hN]`` prefix.

If an agent fails, the others are stopped (SIGTERM to each agent's process group, SIGKILL
after a grace period) and every process still inside the host namespaces is killed, so no
process outlives the call; then the failed workers' elastic error files (each agent writes them
under its ``--log-dir``, see :mod:`lina.cluster.failures`) name the worker that failed first, its
own error line, rank and host (a :class:`~lina.cluster.failures.WorkerFailed`). Workers that
leave no error file (a module not decorated with ``record``, a signal) are named from torchrun's
printed output instead.

Quiet by default: every host gets a name its peers resolve (:mod:`lina.cluster.hostnames`),
``OMP_NUM_THREADS`` is set so torchrun prints no banner, one line per host says where it runs, and
the launchers' own log lines are kept back (``verbose=True`` forwards everything).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from lina.cluster import processes
from lina.cluster.failures import WorkerFailure, raise_for, read_error_file
from lina.cluster.hostnames import host_names
from lina.cluster.lifecycle import EmulatedCluster
from lina.errors import ConfigError, LinaError

_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing", "Broken pipe")
_ROOT_CAUSE_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)")
# Log lines of torch's launchers and c10d (glog style: "W1207 17:53:30.377000 ...", "[W1207 ...]"), and
# the C++ stacks c10d prints when an agent's store goes away as the run ends.
_LAUNCHER_LOG = re.compile(
    r"^(\[rank\d+\]:)?(\[?[WIE]\d{4} \d\d:\d\d:\d\d|Exception raised from |frame #\d+: |<omitting python frames>)"
)


def free_port(cluster: EmulatedCluster, h: int = 0) -> int:
    """A TCP port that nothing listens on at host ``h``'s address (bound once inside its namespace)."""
    from pyroute2 import netns as pnetns

    sock = pnetns.create_socket(cluster.hosts[h].netns, flags=0)
    try:
        sock.bind((cluster.hosts[h].ip, 0))
        return sock.getsockname()[1]
    finally:
        sock.close()


def agent_argv(
    cluster: EmulatedCluster,
    h: int,
    module: str,
    module_args: list[str],
    nproc_per_host: int,
    port: int,
    log_dir: str | None = None,
) -> list[str]:
    """The torchrun command for host ``h`` (not yet wrapped into its namespace); with ``log_dir``
    the agent keeps its workers' error files under it."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={len(cluster.hosts)}",
        f"--node-rank={h}",
        f"--nproc-per-node={nproc_per_host}",
        f"--master-addr={cluster.master_addr}",
        f"--master-port={port}",
        "--max-restarts=0",
        *([f"--log-dir={log_dir}"] if log_dir else []),
        "--module", module, *module_args,
    ]  # fmt: skip


@dataclass
class _Agent:
    host: int
    proc: subprocess.Popen
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=300))
    quiet: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None
    verbose: bool = False


def _forward(agent: _Agent, stream: TextIO, lock: threading.Lock) -> None:
    for raw in agent.proc.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        agent.tail.append(line)
        if not agent.verbose and (line.startswith("Traceback (most recent call last)") or "ChildFailedError" in line):
            agent.quiet.set()  # the agent reports a failure: the error message says it once
        if agent.quiet.is_set() or (not agent.verbose and _LAUNCHER_LOG.match(line)):
            continue  # a stopped agent's dying words, launcher logs: kept for the error message, not printed
        with lock:
            stream.write(f"[h{agent.host}] {line}\n")
            stream.flush()


def run_on_cluster(
    cluster: EmulatedCluster,
    module: str,
    module_args: list[str],
    nproc_per_host: int,
    timeout_s: float | None = None,
    *,
    grace_s: float = 10.0,
    stream: TextIO | None = None,
    verbose: bool = False,
) -> int:
    """Run ``python -m module module_args`` as ``nproc_per_host`` workers on each emulated host.

    Args:
        cluster: an up :class:`EmulatedCluster`.
        module: importable module the workers run (``python -m``).
        module_args: its arguments.
        nproc_per_host: workers per host; world size is hosts x this.
        timeout_s: stop everything and raise after this long (None: no limit).
        grace_s: how long stopped agents get before SIGKILL.
        stream: where workers' output goes (sys.stdout when None).
        verbose: forward the launchers' own log lines too, and add a failed worker's traceback
            to the error.
    Returns:
        0 when every agent exited 0.
    Raises:
        lina.cluster.failures.WorkerFailed: a worker failed with an error file (its own message,
            rank and host; exit code 2 for a ConfigError).
        LinaError: an agent failed without one (names the first failing host / rank) or time ran out.
    """
    if nproc_per_host < 1:
        raise ConfigError("nproc_per_host", f"{nproc_per_host}", "use 1 or more workers per host")
    stream = sys.stdout if stream is None else stream
    lock = threading.Lock()
    port = free_port(cluster, 0)
    agents: list[_Agent] = []
    started = time.monotonic()
    log_dir = Path(tempfile.mkdtemp(prefix="lina-agents-"))
    try:
        with host_names(cluster) as names:
            for host in cluster.hosts:
                env = cluster.host_env(host.index)
                env["PYTHONUNBUFFERED"] = "1"
                if nproc_per_host > 1:
                    env.setdefault("OMP_NUM_THREADS", "1")  # what torchrun would set, without its banner
                first = host.index * nproc_per_host
                stream.write(
                    f"[h{host.index}] host {names[host.index]} ({host.ip}, namespace {host.netns}): "
                    f"{nproc_per_host} worker(s), ranks {first}..{first + nproc_per_host - 1}\n"
                )
                stream.flush()
                argv = agent_argv(
                    cluster, host.index, module, module_args, nproc_per_host, port, str(log_dir / f"h{host.index}")
                )
                proc = subprocess.Popen(
                    cluster.wrap(host.index, argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
                agent = _Agent(host.index, proc, verbose=verbose)
                agent.reader = threading.Thread(target=_forward, args=(agent, stream, lock), daemon=True)
                agent.reader.start()
                agents.append(agent)
            failed = _wait(agents, started, timeout_s)
            if failed == "timeout":
                raise LinaError(
                    f"{module} on {len(agents)} emulated hosts did not finish within {timeout_s:g}s; all "
                    "workers were stopped"
                )
            if failed is not None:
                failed = _settle_and_pick_origin(agents, failed)
                _stop(agents, cluster, grace_s)
                recorded = error_file_failures(log_dir, nproc_per_host, names)
                if not all(f.lost_peer for f in recorded):  # else the origin left no file (a signal)
                    raise_for(recorded, verbose)
                raise LinaError(_failure_message(failed, agents, nproc_per_host))
            return 0
    finally:
        _stop(agents, cluster, grace_s)
        shutil.rmtree(log_dir, ignore_errors=True)


def error_file_failures(log_dir: Path, nproc_per_host: int, names: list[str] | None = None) -> list[WorkerFailure]:
    """The failures recorded in the elastic error files under ``log_dir`` (the agent of host h
    keeps them under ``h<h>/<run id>/attempt_<n>/<local rank>/error.json``)."""
    out = []
    for path in sorted(log_dir.glob("h*/**/error.json")):
        h = int(path.relative_to(log_dir).parts[0][1:])
        local_rank = int(path.parent.name)
        message, callstack, stamp = read_error_file(path)
        if message:
            host = names[h] if names else f"h{h}"
            out.append(WorkerFailure(h * nproc_per_host + local_rank, f"h{h} ({host})", 1, message, callstack, stamp))
    return out


def _wait(agents: list[_Agent], started: float, timeout_s: float | None) -> _Agent | str | None:
    """Poll until all agents exit 0 (None), one fails (that agent) or time runs out ("timeout")."""
    while True:
        running = 0
        for agent in agents:
            code = agent.proc.poll()
            if code is None:
                running += 1
            elif code != 0:
                return agent
        if running == 0:
            return None
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            return "timeout"
        time.sleep(0.05)


def _settle_and_pick_origin(agents: list[_Agent], first: _Agent, settle_s: float = 1.0) -> _Agent:
    """The failed agent most likely to hold the original error.

    A crash on one host makes its peers fail too, within milliseconds, with Gloo's
    "connection closed by peer" kind of error; which agent exits first is a race. So wait
    ``settle_s`` for the others to report, then prefer a failure that is not a lost peer.
    """
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline and any(a.proc.poll() is None for a in agents):
        time.sleep(0.05)
    failed = [a for a in agents if a.proc.poll() not in (None, 0)]
    for agent in sorted(failed, key=lambda a: (a is not first, a.host)):
        if not any(marker in line for line in agent.tail for marker in _LOST_PEER):
            return agent
    return first


def _stop(agents: list[_Agent], cluster: EmulatedCluster, grace_s: float) -> None:
    """Stop every agent and its workers, then kill whatever still runs inside the host namespaces."""
    live = [a for a in agents if a.proc.poll() is None]
    for agent in live:
        agent.quiet.set()
        _killpg(agent.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for agent in live:
        try:
            agent.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _killpg(agent.proc.pid, signal.SIGKILL)
            agent.proc.wait()
    # torchrun starts workers in their own sessions; orphans are found by namespace.
    processes.kill_netns_processes([h.netns for h in cluster.hosts], grace_s=min(grace_s, 3.0))
    for agent in agents:
        if agent.reader is not None:
            agent.reader.join(timeout=2.0)


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _failure_message(failed: _Agent, agents: list[_Agent], nproc_per_host: int) -> str:
    h = failed.host
    first, last = h * nproc_per_host, (h + 1) * nproc_per_host - 1
    ranks = f"rank {first}" if first == last else f"ranks {first}..{last}"
    lines = list(failed.tail)
    root_rank = _root_cause_rank(lines)
    rank_note = (
        "" if root_rank is None else f", first failed worker: global rank {root_rank[0]} (local rank {root_rank[1]})"
    )
    others = ", ".join(
        f"h{a.host}={a.proc.returncode}" for a in agents if a is not failed and a.proc.returncode not in (None, 0)
    )
    msg = f"host {h} ({ranks}) failed with exit code {failed.proc.returncode}{rank_note}"
    if others:
        msg += f"; also failed (often from losing that peer): {others}"
    worker_lines = [x for x in lines if root_rank is not None and x.startswith(f"[rank{root_rank[0]}]:")]
    shown = (worker_lines or lines)[-12:]
    tail = "\n".join(f"  [h{h}] {line}" for line in shown)
    return msg + f"; all other workers were stopped. Last output of that worker:\n{tail}"


def _root_cause_rank(lines: list[str]) -> tuple[int, int] | None:
    """(global rank, local rank) from torchrun's "Root Cause (first observed failure)" block, if printed."""
    for i, line in enumerate(lines):
        if "Root Cause" in line:
            for later in lines[i + 1 : i + 8]:
                match = _ROOT_CAUSE_RANK.match(later)
                if match:
                    return int(match.group(1)), int(match.group(2))
    return None

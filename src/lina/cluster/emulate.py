"""The emulated multi-host cluster: H network namespaces whose links are really rate-limited.

Usage::

    spec = parse_emulate("hosts=4,link=200mbit,workers_per_host=1")
    with EmulatedCluster(spec) as cluster:
        subprocess.run(cluster.wrap(0, ["python", "-m", "x"]), env=cluster.host_env(0))

Each host is a namespace holding one end of a veth pair whose other end is a port of a
bridge in a dedicated switch namespace. Both ends shape their egress (token buckets: an
htb class per peer host by default, or one tbf FIFO), so a host's upload and download are
each limited to the link rate, like a host NIC into a non-blocking switch. Traffic
between workers of one host goes to the host's own address, which the kernel routes over
that namespace's loopback: unlimited, like NVLink in a node.

The cluster is torn down on every exit path: normal exit, exception, SIGINT/SIGTERM/SIGHUP
(handlers are installed while it is up and restored after) and interpreter exit. Processes
still running inside its namespaces are killed first. A SIGKILLed owner leaves its state
file behind with a dead owner pid, which is how ``lina cluster down --all`` tells stale
clusters from live ones.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lina.cluster import netns
from lina.emulation_spec import (  # noqa: F401  (the spec and its grammar, re-exported)
    EmulateSpec,
    format_rate,
    parse_duration_us,
    parse_emulate,
    parse_rate,
)
from lina.errors import ConfigError, LinaError

# --------------------------------------------------------------------------- state files


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
    return netns.process_start_time(pid) == state.get("owner_start")


# --------------------------------------------------------------------------- cluster


@dataclass(frozen=True)
class Host:
    """One emulated host: its namespace, address and veth name (inside the namespace)."""

    index: int
    netns: str
    ip: str
    ifname: str


class EmulatedCluster:
    """Context manager that builds the emulated cluster on enter and removes it on every exit.

    Args:
        spec: hosts, link rate, delay, workers per host.
        prefix: run prefix (``lina-<6 hex>``); a fresh one when None.
        support: machine facts to check (probed when None; tests inject a lacking one).
        handle_signals: install SIGINT/SIGTERM/SIGHUP handlers while up (main thread only).
        alternative: the caller's no-emulation option, named when privileges are missing
            (None: the caller has none).
    """

    def __init__(
        self,
        spec: EmulateSpec,
        *,
        prefix: str | None = None,
        support: netns.Support | None = None,
        handle_signals: bool = True,
        alternative: str | None = "--emulate none",
    ):
        self.spec = spec
        self.prefix = prefix or netns.new_prefix()
        if netns.run_prefix_of(self.prefix + "-x") != self.prefix:
            raise ConfigError("prefix", f"{self.prefix!r}", "use lina-<6 hex digits>, e.g. lina-3fa9c1")
        self._support = support
        self._handle_signals = handle_signals
        self._alternative = alternative
        self.hosts = [
            Host(h, netns.host_netns(self.prefix, h), netns.host_ip(h), netns.host_ifname(h)) for h in range(spec.hosts)
        ]
        self.switch_netns = netns.switch_netns(self.prefix)
        self._lock = threading.RLock()
        self._up = False
        self._detached = False
        self._old_handlers: dict[int, object] = {}
        self._state_path: Path | None = None
        self._owner_pid = os.getpid()

    # -- properties the launchers use ----------------------------------------------------

    @property
    def master_addr(self) -> str:
        return self.hosts[0].ip

    @property
    def namespaces(self) -> list[str]:
        return [h.netns for h in self.hosts] + [self.switch_netns]

    def host_env(self, h: int, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for processes on host ``h``: ``base`` (os.environ) plus Gloo's interface and MASTER_ADDR."""
        env = dict(os.environ if base is None else base)
        env["GLOO_SOCKET_IFNAME"] = self.hosts[h].ifname
        env["TP_SOCKET_IFNAME"] = self.hosts[h].ifname
        env["MASTER_ADDR"] = self.master_addr
        return env

    def link_counters(self) -> list[dict[str, dict[str, int]]]:
        """Per host: ``{"up": counters, "down": counters}`` of its link's token buckets
        (see :func:`lina.cluster.netns.read_egress_counters`); counts since the cluster came up."""
        return [
            {
                "up": netns.read_egress_counters(h.netns, h.ifname),
                "down": netns.read_egress_counters(self.switch_netns, netns.port_ifname(h.index)),
            }
            for h in self.hosts
        ]

    def wrap(self, h: int, argv: list[str]) -> list[str]:
        """``argv`` made to run inside host ``h``'s namespace."""
        return netns.exec_argv(self.hosts[h].netns, list(argv))

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> "EmulatedCluster":
        self.up()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.down()

    def up(self) -> None:
        """Build namespaces, bridge, veths, addresses and shaping; undo everything on failure."""
        netns.require_support(self._support, self._alternative)
        from pyroute2.netlink.exceptions import NetlinkError  # pyroute2 loads only when a cluster is built

        with self._lock:
            if self._up:
                return
            self._owner_pid = os.getpid()
            self._up = True
            self._write_state()
            self._install_signal_handlers()
            atexit.register(self.down)
            try:
                self._build()
            except LinaError:
                self.down()
                raise
            except (NetlinkError, OSError, RuntimeError, ValueError, IndexError) as err:
                self.down()
                raise LinaError(f"could not build the emulated cluster {self.prefix}: {err}") from err
            except BaseException:
                self.down()
                raise

    def _build(self) -> None:
        s = self.spec
        netns.create_netns(self.switch_netns)
        netns.add_bridge(self.switch_netns)
        half_delay = int(round(s.delay_us / 2))
        for host in self.hosts:
            netns.create_netns(host.netns)
            port = netns.port_ifname(host.index)
            netns.add_host_link(host.netns, host.ifname, host.ip, self.switch_netns, port)
            peers = {o.index: o.ip for o in self.hosts if o is not host} if s.share == "peer" else None
            shaping = dict(delay_us=half_delay, queue_ms=s.queue_ms, peers=peers)
            netns.shape_egress(host.netns, host.ifname, s.link_bps, match="dst", **shaping)  # upload
            netns.shape_egress(self.switch_netns, port, s.link_bps, match="src", **shaping)  # download

    def detach(self) -> None:
        """Leave the cluster up after this process exits (``lina cluster up``); ``lina cluster down`` removes it."""
        with self._lock:
            self._detached = True
            self._write_state()
            self._restore_signal_handlers()
            atexit.unregister(self.down)

    def down(self) -> None:
        """Kill processes left inside, delete the namespaces, remove the state file. Idempotent."""
        if os.getpid() != self._owner_pid:
            return  # a forked child (pyroute2 forks helpers) running our atexit/signal hooks: not ours to remove
        with self._lock:
            if not self._up or self._detached:
                return
            deferred: list[int] = []
            self._defer_signals(deferred)
            try:
                teardown(self.prefix, self.spec.hosts)
                if self._state_path is not None:
                    self._state_path.unlink(missing_ok=True)
                self._up = False
            finally:
                self._restore_signal_handlers()
                atexit.unregister(self.down)
            if deferred:
                _redeliver(deferred[0])

    # -- state and signals ----------------------------------------------------------------

    def state(self) -> dict:
        pid = None if self._detached else os.getpid()
        return {
            "prefix": self.prefix,
            "spec": str(self.spec),
            "hosts": [asdict(h) for h in self.hosts],
            "switch_netns": self.switch_netns,
            "bridge": netns.BRIDGE,
            "owner_pid": pid,
            "owner_start": None if pid is None else netns.process_start_time(pid),
            "detached": self._detached,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def _write_state(self) -> None:
        self._state_path = state_dir() / f"{self.prefix}.json"
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=1))
        tmp.replace(self._state_path)

    def _install_signal_handlers(self) -> None:
        if not self._handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._owner_pid:
            # A forked helper (pyroute2 forks some) is being stopped: it owns nothing, so it ends
            # at once, without running the owner's handlers (which may raise and print).
            os._exit(128 + signum)
        self.down()  # removes the cluster and restores the previous handlers
        if signal.getsignal(signum) == self._on_signal:  # down() ran in another thread and could not restore
            signal.signal(signum, self._old_handlers.pop(signum, signal.SIG_DFL))
        _redeliver(signum)  # then the signal acts as it would have (SIGTERM: SystemExit(143))

    def _defer_signals(self, deferred: list[int]) -> None:
        if not self._old_handlers or threading.current_thread() is not threading.main_thread():
            return
        for sig in self._old_handlers:
            signal.signal(sig, lambda signum, frame: deferred.append(signum))

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; ours stay and act as a no-op down() then
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()


def _redeliver(signum: int) -> None:
    """Act on ``signum`` as the restored handler would.

    A default SIGTERM/SIGHUP becomes ``SystemExit(128 + signum)`` rather than an abrupt death,
    so that ``finally`` blocks up the stack (e.g. stopping launched workers) still run.
    """
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)


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
    netns.kill_netns_processes(present)
    deleted = [n for n in present if netns.delete_netns(n)]
    for link in netns.root_project_links(prefix + "-"):
        netns.delete_root_link(link)
    return deleted


# --------------------------------------------------------------------------- finding clusters


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

"""Linux network-namespace plumbing for the emulated cluster (via pyroute2).

Topology built by :mod:`lina.cluster.emulate` from these pieces::

    netns <prefix>-h0                  netns <prefix>-sw                 netns <prefix>-h1
    veth-h0 10.213.0.1/24 <--veth--> port0 ┐                   ┌ port1 <--veth--> veth-h1 10.213.0.2/24
      egress: tbf (host upload)          egress: tbf (host download)
                                             └──── bridge br0 ───┘

Every link and address lives inside the project's namespaces: each veth pair is created
directly with one end in the host namespace and the other in the switch namespace, so
nothing is ever added to the root namespace's links or routes. Deleting the namespaces
deletes the veths and the bridge with them.

Namespace names start with ``lina-<6 hex>-`` (one prefix per run), which is how stale
ones from killed runs are found.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from lina.errors import LinaError

PROJECT_PREFIX = "lina-"
NETNS_DIR = Path("/run/netns")
SUBNET = "10.213.0"  # host h gets SUBNET.(h+1)/24; it exists only inside project namespaces
PREFIX_LEN = 24
BRIDGE = "br0"

_PREFIX_RE = re.compile(r"^(lina-[0-9a-f]{6})-")
_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21


def new_prefix() -> str:
    """A fresh run prefix, e.g. ``lina-3fa9c1``."""
    return f"{PROJECT_PREFIX}{secrets.token_hex(3)}"


def run_prefix_of(name: str) -> str | None:
    """The run prefix of a project namespace/link name (``lina-3fa9c1-h0`` -> ``lina-3fa9c1``)."""
    match = _PREFIX_RE.match(name)
    return match.group(1) if match else None


def host_netns(prefix: str, h: int) -> str:
    return f"{prefix}-h{h}"


def switch_netns(prefix: str) -> str:
    return f"{prefix}-sw"


def host_ifname(h: int) -> str:
    """Host-side veth name (inside the host's own namespace; IFNAMSIZ-safe for any h < 1000)."""
    return f"veth-h{h}"


def port_ifname(h: int) -> str:
    """Switch-side veth name of host h (inside the switch namespace)."""
    return f"port{h}"


def host_ip(h: int) -> str:
    return f"{SUBNET}.{h + 1}"


# --------------------------------------------------------------------------- support


@dataclass(frozen=True)
class Support:
    """What building namespaces needs from this machine.

    Args:
        net_admin: CAP_NET_ADMIN and CAP_SYS_ADMIN are in the effective set (root has both).
        ip_binary: path of iproute2's ``ip`` (runs commands inside a namespace), or None.
        netns: the kernel has network namespaces (``/proc/self/ns/net`` exists).
    """

    net_admin: bool
    ip_binary: str | None
    netns: bool

    def missing(self) -> list[str]:
        out = []
        if not self.net_admin:
            out.append("root or CAP_NET_ADMIN+CAP_SYS_ADMIN (run as root, e.g. with sudo)")
        if not self.netns:
            out.append("network namespace support in the kernel (CONFIG_NET_NS)")
        if self.ip_binary is None:
            out.append("the `ip` command from iproute2 (apt-get install iproute2)")
        return out


def _effective_caps() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        return 0
    return 0


def probe_support() -> Support:
    """Look at this process and machine; starts nothing."""
    caps = _effective_caps()
    admin = bool(caps >> _CAP_NET_ADMIN & 1) and bool(caps >> _CAP_SYS_ADMIN & 1)
    return Support(
        net_admin=admin,
        ip_binary=shutil.which("ip"),
        netns=os.path.exists("/proc/self/ns/net"),
    )


def require_support(support: Support | None = None, alternative: str = "--emulate none") -> Support:
    """Raise a :class:`LinaError` naming what is missing, with the plain-loopback alternative.

    Args:
        support: the facts to judge (``probe_support()`` when None; tests inject their own).
        alternative: the option that runs without emulation, offered in the message.
    """
    support = probe_support() if support is None else support
    missing = support.missing()
    if missing:
        raise LinaError(
            "the emulated multi-host cluster needs " + "; ".join(missing)
            + f". Without it, run with {alternative} (plain loopback: communication is nearly"
            " free there, so it says nothing about link contention)"
        )
    return support


# --------------------------------------------------------------------------- namespaces


def create_netns(name: str) -> None:
    """Create a named network namespace (``/run/netns/<name>``) with ``lo`` up."""
    from pyroute2 import IPRoute, netns

    netns.create(name)
    with IPRoute(netns=name, flags=0) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def delete_netns(name: str) -> bool:
    """Remove a named namespace; its veths (and their peers) and bridges go with it.

    Returns False when it did not exist.
    """
    from pyroute2 import netns

    if not (NETNS_DIR / name).exists():
        return False
    netns.remove(name)
    return True


def list_project_netns(prefix: str = PROJECT_PREFIX) -> list[str]:
    """Names of existing namespaces that start with ``prefix``."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def root_project_links(prefix: str = PROJECT_PREFIX) -> list[str]:
    """Links in the root namespace whose name starts with ``prefix`` (normally none: we put none there)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    return sorted(n for n in names if n and n.startswith(prefix))


def delete_root_link(name: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if idx:
            ipr.link("del", index=idx[0])


# --------------------------------------------------------------------------- links


def add_bridge(ns: str, name: str = BRIDGE) -> None:
    """Create an up bridge inside namespace ``ns``."""
    from pyroute2 import IPRoute

    with IPRoute(netns=ns, flags=0) as ipr:
        ipr.link("add", ifname=name, kind="bridge")
        ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")


def add_host_link(host_ns: str, ifname: str, ip: str, switch_ns: str, port: str, bridge: str = BRIDGE) -> None:
    """A veth pair from ``host_ns`` (``ifname``, address ``ip``/24, up) to ``switch_ns`` (``port``, enslaved to ``bridge``)."""
    from pyroute2 import IPRoute

    with IPRoute(netns=host_ns, flags=0) as ipr:
        ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": port, "net_ns_fd": switch_ns})
        idx = ipr.link_lookup(ifname=ifname)[0]
        ipr.addr("add", index=idx, address=ip, prefixlen=PREFIX_LEN)
        ipr.link("set", index=idx, state="up")
    with IPRoute(netns=switch_ns, flags=0) as ipr:
        br = ipr.link_lookup(ifname=bridge)[0]
        ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=br, state="up")


def tbf_burst_bytes(rate_bps: int) -> int:
    """Token-bucket depth: 2 ms at the link rate, at least 16 KiB (well above one MTU frame)."""
    return max(16 * 1024, int(rate_bps / 8 * 0.002))


def shape_egress(ns: str, ifname: str, rate_bps: int, delay_us: int = 0, queue_ms: float = 20.0) -> None:
    """Limit what leaves ``ifname`` (in ``ns``) to ``rate_bps``, optionally after ``delay_us``.

    Without delay: a root ``tbf`` (rate, a burst of :func:`tbf_burst_bytes`, a queue that
    holds ``queue_ms`` of traffic). With delay: ``netem`` at the root and the same ``tbf``
    as its child (the layout netem's documentation gives for delay plus rate).
    Large GSO frames are split by tbf itself, so offloads can stay on.
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    burst = tbf_burst_bytes(rate_bps)
    tbf = dict(rate=int(rate_bps // 8), burst=burst, latency=int(queue_ms * 1000))  # bytes/s, bytes, us
    with IPRoute(netns=ns, flags=0) as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        if delay_us > 0:
            try:
                ipr.tc("add", "netem", idx, handle="1:", delay=int(delay_us), limit=10000)
            except NetlinkError as err:
                raise LinaError(
                    f"this kernel refused the netem qdisc (netlink error {err.code}: {os.strerror(err.code)});"
                    " it is needed to emulate link delay. Drop the delay (links are still rate-limited)"
                    " or use a kernel with CONFIG_NET_SCH_NETEM"
                ) from err
            ipr.tc("add", "tbf", idx, handle="10:", parent="1:1", **tbf)
        else:
            try:
                ipr.tc("add", "tbf", idx, handle="1:", **tbf)
            except NetlinkError as err:
                raise LinaError(
                    f"this kernel refused the tbf qdisc (netlink error {err.code}: {os.strerror(err.code)}); rate limits need"
                    " CONFIG_NET_SCH_TBF. Run with --emulate none (plain loopback) instead"
                ) from err


def read_egress_rate(ns: str, ifname: str) -> int | None:
    """The tbf rate (bits/s) configured on ``ifname`` in ``ns``, or None when there is none."""
    from pyroute2 import IPRoute

    with IPRoute(netns=ns, flags=0) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return None
        for qdisc in ipr.get_qdiscs(idx[0]):
            if qdisc.get_attr("TCA_KIND") == "tbf":
                parms = qdisc.get_attr("TCA_OPTIONS").get_attr("TCA_TBF_PARMS")
                return int(parms["rate"]) * 8
    return None


# --------------------------------------------------------------------------- processes


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

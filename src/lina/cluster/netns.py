"""Linux network-namespace plumbing for the emulated cluster (via pyroute2).

Topology built by :mod:`lina.cluster.emulate` from these pieces::

    netns <prefix>-h0                  netns <prefix>-sw                 netns <prefix>-h1
    veth-h0 10.213.0.1/24 <--veth--> port0 ┐                   ┌ port1 <--veth--> veth-h1 10.213.0.2/24
      egress: shaper (host upload)       egress: shaper (host download)
                                             └──── bridge br0 ───┘

The shaper is an htb with one class per peer (``peer`` sharing) or one tbf FIFO
(``fifo`` sharing); see :func:`shape_egress`.

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
from lina.extras import install_hint, installed

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
        pyroute2: the pyroute2 package is installed (the ``lina[cluster]`` extra).
    """

    net_admin: bool
    ip_binary: str | None
    netns: bool
    pyroute2: bool = True

    def missing(self) -> list[str]:
        out = []
        if not self.net_admin:
            out.append("root or CAP_NET_ADMIN+CAP_SYS_ADMIN (run as root, e.g. with sudo)")
        if not self.netns:
            out.append("network namespace support in the kernel (CONFIG_NET_NS)")
        if self.ip_binary is None:
            out.append("the `ip` command from iproute2 (apt-get install iproute2)")
        if not self.pyroute2:
            out.append(f"the pyroute2 package ({install_hint('pyroute2')})")
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
        pyroute2=installed("pyroute2"),
    )


def require_support(support: Support | None = None, alternative: str | None = "--emulate none") -> Support:
    """Raise a :class:`LinaError` naming what is missing, with the plain-loopback alternative.

    Args:
        support: the facts to judge (``probe_support()`` when None; tests inject their own).
        alternative: the option that runs without emulation, offered in the message; None
            when the caller has no such mode (the message then says so).
    """
    support = probe_support() if support is None else support
    missing = support.missing()
    if missing:
        if alternative is None:
            tail = "; this command has no loopback mode, since links must be limited for it to mean anything"
        else:
            tail = (
                f". Without it, run with {alternative} (plain loopback: communication is nearly free there,"
                " so it says nothing about link contention)"
            )
        raise LinaError("the emulated multi-host cluster needs " + "; ".join(missing) + tail)
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


SHARES = ("peer", "fifo")
_ROOT = 0x10000  # handle 1:
_LINK_CLASS = 0x10001  # class 1:1, the whole link
_OTHER_MINOR = 0xFF  # class 1:ff, traffic matching no peer (ARP, IPv6 neighbour discovery)
_PEER_MINOR0 = 0x10  # class 1:(10+j) for peer host j


def htb_burst_bytes(rate_bps: int) -> int:
    """Token-bucket depth of the per-peer htb classes: 0.5 ms at the link rate, at least 16 KiB.

    Whatever a bucket holds can leave at once, above the link rate; keeping it small keeps
    short transfers (one all-to-all of a few hundred KiB) honest. htb holds 1 Gbit/s with it.
    """
    return max(16 * 1024, int(rate_bps / 8 * 0.0005))


def tbf_burst_bytes(rate_bps: int) -> int:
    """Bucket depth of the fifo tbf: 1 ms at the link rate, at least 128 KiB.

    tbf needs the deeper bucket to hold its rate: measured here at 1 Gbit/s, a 16 KiB
    bucket gave 652 Mbit/s, 66 KiB 767 Mbit/s and 128 KiB 932 Mbit/s of TCP goodput.
    """
    return max(128 * 1024, int(rate_bps / 8 * 0.001))


def _ip_u32(ip: str) -> int:
    a, b, c, d = (int(x) for x in ip.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


def shape_egress(
    ns: str,
    ifname: str,
    rate_bps: int,
    *,
    delay_us: int = 0,
    queue_ms: float = 100.0,
    peers: dict[int, str] | None = None,
    match: str = "dst",
) -> None:
    """Limit what leaves ``ifname`` (in ``ns``) to ``rate_bps``, optionally after ``delay_us``.

    Two disciplines:

    * ``peers`` given (share ``peer``): an ``htb`` root whose class 1:1 holds the link rate,
      with one child class per peer host (``u32`` filter on the packet's ``match`` address,
      ``dst`` on a host's upload and ``src`` on its download) plus one for anything else.
      Children are served round-robin and each may use the whole link when alone, so busy
      peers split the link evenly; flows to the same peer share that class's FIFO. Each
      leaf queue holds ``queue_ms`` of traffic at the link rate (a ``netem`` leaf adds the
      delay).
    * ``peers`` None (share ``fifo``): one ``tbf`` with a queue of ``queue_ms``, like a
      switch port: every flow shares one FIFO and TCP decides the split (unevenly, over
      seconds, when the queue is deep). With delay, ``netem`` is the root and ``tbf`` its
      child (the layout netem's documentation gives).

    Large GSO frames are handled by the qdiscs, so offloads can stay on.
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    if match not in ("dst", "src"):
        raise ValueError(f"match must be dst or src, not {match!r}")
    with IPRoute(netns=ns, flags=0) as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        try:
            if peers is None:
                _shape_fifo(ipr, idx, rate_bps, delay_us, queue_ms)
            else:
                _shape_per_peer(ipr, idx, rate_bps, delay_us, queue_ms, peers, match)
        except NetlinkError as err:
            what = (
                "netem (CONFIG_NET_SCH_NETEM), needed for delay"
                if delay_us
                else (
                    "tbf (CONFIG_NET_SCH_TBF)"
                    if peers is None
                    else "htb and u32 (CONFIG_NET_SCH_HTB, CONFIG_NET_CLS_U32)"
                )
            )
            raise LinaError(
                f"this kernel refused a traffic-control setting on {ifname} (netlink error {err.code}:"
                f" {os.strerror(err.code)}); the emulated links need {what}. Drop the delay if one was"
                " set, use the other share= discipline, or run with --emulate none (plain loopback)"
            ) from err


def _shape_fifo(ipr, idx: int, rate_bps: int, delay_us: int, queue_ms: float) -> None:
    tbf = dict(rate=int(rate_bps // 8), burst=tbf_burst_bytes(rate_bps), latency=int(queue_ms * 1000))  # B/s, B, us
    if delay_us > 0:
        ipr.tc("add", "netem", idx, handle="1:", delay=int(delay_us), limit=100_000)
        ipr.tc("add", "tbf", idx, handle="10:", parent="1:1", **tbf)
    else:
        ipr.tc("add", "tbf", idx, handle="1:", **tbf)


def _shape_per_peer(
    ipr, idx: int, rate_bps: int, delay_us: int, queue_ms: float, peers: dict[int, str], match: str
) -> None:
    rate = int(rate_bps // 8)  # bytes/s, as pyroute2 takes it
    burst = htb_burst_bytes(rate_bps)
    limit = max(64, int(rate * queue_ms / 1e3 / 1514))  # packets per leaf queue
    share = max(1, rate // (len(peers) + 1))  # assured rate; any class may borrow up to the link
    classes = dict(ceil=rate, burst=burst, cburst=burst, quantum=8 * 1024)
    ipr.tc("add", "htb", idx, _ROOT, default=_OTHER_MINOR)
    ipr.tc("add-class", "htb", idx, _LINK_CLASS, parent=_ROOT, rate=rate, **classes)
    offset = 16 if match == "dst" else 12  # IPv4 header: source address at byte 12, destination at 16
    for minor, ip in [(_OTHER_MINOR, None)] + [(_PEER_MINOR0 + j, ip) for j, ip in sorted(peers.items())]:
        ipr.tc("add-class", "htb", idx, _ROOT | minor, parent=_LINK_CLASS, rate=share, **classes)
        if delay_us > 0:
            ipr.tc("add", "netem", idx, minor << 16, parent=_ROOT | minor, delay=int(delay_us), limit=limit)
        else:
            ipr.tc("add", "pfifo", idx, minor << 16, parent=_ROOT | minor, limit=limit)
        if ip is not None:
            ipr.tc(
                "add-filter", "u32", idx, parent=_ROOT, prio=1, protocol=0x0800,  # ETH_P_IP
                target=_ROOT | minor, keys=[f"0x{_ip_u32(ip):08x}/0xffffffff+{offset}"],
            )  # fmt: skip


def read_egress_rate(ns: str, ifname: str) -> int | None:
    """The link rate (bits/s) shaped on ``ifname`` in ``ns`` (tbf rate or htb class 1:1), or None."""
    from pyroute2 import IPRoute

    with IPRoute(netns=ns, flags=0) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return None
        for qdisc in ipr.get_qdiscs(idx[0]):
            if qdisc.get_attr("TCA_KIND") == "tbf":
                return int(qdisc.get_attr("TCA_OPTIONS").get_attr("TCA_TBF_PARMS")["rate"]) * 8
        for cls in ipr.get_classes(idx[0]):
            if cls.get_attr("TCA_KIND") == "htb" and cls["handle"] == _LINK_CLASS:
                return int(cls.get_attr("TCA_OPTIONS").get_attr("TCA_HTB_PARMS")["rate"]) * 8
    return None


def read_egress_counters(ns: str, ifname: str) -> dict[str, int]:
    """Counters of the root qdisc on ``ifname`` in ``ns``: bytes, packets, drops, overlimits.

    Drops are packets a link queue had no room for; TCP then retransmits, and a lost tail
    can stall a flow for a retransmission timeout (200 ms minimum on Linux), an artefact a
    lossless fabric (InfiniBand) does not have. Zeros when nothing is shaped.
    """
    from pyroute2 import IPRoute

    out = {"bytes": 0, "packets": 0, "drops": 0, "overlimits": 0}
    with IPRoute(netns=ns, flags=0) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return out
        for qdisc in ipr.get_qdiscs(idx[0]):
            if qdisc["parent"] != 0xFFFFFFFF or qdisc.get_attr("TCA_KIND") not in ("tbf", "htb", "netem"):
                continue
            stats = qdisc.get_attr("TCA_STATS2")
            queue, basic = stats.get_attr("TCA_STATS_QUEUE"), stats.get_attr("TCA_STATS_BASIC")
            out.update(
                bytes=basic["bytes"], packets=basic["packets"], drops=queue["drops"], overlimits=queue["overlimits"]
            )
    return out


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

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

This module holds the namespaces and links; shaping them is :mod:`lina.cluster.shaping`'s job and
running commands inside them :mod:`lina.cluster.processes`'; their names are re-exported here.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from lina.cluster.processes import (  # noqa: F401  (re-exported: callers know them as netns.*)
    NETNS_DIR,
    _running,  # noqa: F401
    exec_argv,
    kill_netns_processes,
    pids_in_netns,
    process_start_time,
)
from lina.cluster.shaping import (  # noqa: F401
    SHARES,
    htb_burst_bytes,
    read_egress_counters,
    read_egress_rate,
    shape_egress,
    tbf_burst_bytes,
)
from lina.errors import LinaError
from lina.extras import install_hint, installed

PROJECT_PREFIX = "lina-"
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

"""Traffic control for the emulated links: token buckets, per-peer round-robin, delay, counters.

:func:`shape_egress` limits what leaves one interface (an htb with a class per peer host, or one
tbf FIFO, optionally behind netem); :func:`read_egress_rate` and :func:`read_egress_counters` read
back what is shaped and what crossed it. Everything goes through pyroute2's netlink socket inside
the named namespace.
"""

from __future__ import annotations

import os

from lina.emulation_spec import SHARES  # noqa: F401  (how a link is shared; re-exported for netns)
from lina.errors import LinaError

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


def shape_loopback(ns: str, rate_bps: int, *, queue_ms: float = 100.0) -> None:
    """Limit ``lo`` in ``ns`` to ``rate_bps``: the intra-host link of an emulated host.

    Workers of one host reach each other at the host's own address, which the kernel routes over
    ``lo``; each packet leaves ``lo`` once, so one tbf FIFO there makes all intra-host traffic
    share ``rate_bps`` (like a node's NVLink fabric, shared and never dropping: the queue holds
    ``queue_ms`` at the rate). Loopback's 64 KiB frames fit tbf's bucket (at least 128 KiB).
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute(netns=ns, flags=0) as ipr:
        idx = ipr.link_lookup(ifname="lo")[0]
        try:
            _shape_fifo(ipr, idx, rate_bps, 0, queue_ms)
        except NetlinkError as err:
            raise LinaError(
                f"this kernel refused a tbf on lo (netlink error {err.code}: {os.strerror(err.code)}); the"
                " intra-host link needs tbf (CONFIG_NET_SCH_TBF). Drop intra= from --emulate (free loopback)"
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

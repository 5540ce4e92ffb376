"""``lina cluster up | status | down``: keep an emulated multi-host cluster up, inspect it, remove it.

lina cluster up --hosts 4 --workers-per-host 1 --link 200mbit [--delay 50us]
lina cluster status
lina cluster down              # clusters left up by `lina cluster up`
lina cluster down --all        # ... and stale ones from killed runs (lina-* namespaces)
lina cluster down lina-3fa9c1  # one cluster by its prefix
"""

from __future__ import annotations

import argparse

from lina.cluster import netns, shaping
from lina.cluster.lifecycle import EmulatedCluster
from lina.cluster.registry import remove_cluster, state_dir, survey
from lina.cluster.spec import EmulateSpec, parse_duration_us, parse_rate
from lina.errors import LinaError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cluster",
        help="emulated multi-host cluster (network namespaces with rate-limited links)",
        description="Turn this machine into H hosts whose links are really rate-limited (needs root).",
    )
    sub = parser.add_subparsers(dest="cluster_command", metavar="ACTION")
    up = sub.add_parser("up", help="build a cluster and leave it up")
    up.add_argument("--hosts", type=int, default=4, help="number of emulated hosts (default 4)")
    up.add_argument("--workers-per-host", type=int, default=1, help="workers each host will run (default 1)")
    up.add_argument(
        "--link", default="200mbit", help="each host's link rate, each way: kbit/mbit/gbit (default 200mbit)"
    )
    up.add_argument("--delay", default="0", help="one-way host-to-host latency, e.g. 50us (default 0; needs netem)")
    up.add_argument("--queue", default="100ms", help="link queue depth in time at the link rate (default 100ms)")
    up.add_argument(
        "--share",
        default="peer",
        choices=("peer", "fifo"),
        help="link sharing: round-robin between peer hosts, or one FIFO like a switch port (default peer)",
    )
    up.set_defaults(func=run_up)
    status = sub.add_parser("status", help="list emulated clusters on this machine")
    status.set_defaults(func=run_status)
    down = sub.add_parser("down", help="remove clusters left up by `lina cluster up`")
    down.add_argument("prefix", nargs="?", help="remove only this cluster (e.g. lina-3fa9c1)")
    down.add_argument("--all", action="store_true", help="also remove stale lina-* namespaces from killed runs")
    down.add_argument("--force", action="store_true", help="also remove clusters whose owner process is still running")
    down.set_defaults(func=run_down)
    eff = sub.add_parser(
        "link-efficiency",
        help="measure the fraction of the link rate an all-to-all alone reaches, per link rate, and the "
        "simulator's link_efficiency fitted to it",
    )
    eff.add_argument("--hosts", type=int, default=4, help="emulated hosts (default 4)")
    eff.add_argument("--workers-per-host", type=int, default=1, help="workers per host (default 1)")
    eff.add_argument(
        "--links", default="100mbit,400mbit,1gbit", help="comma list of link rates (default 100mbit,400mbit,1gbit)"
    )
    eff.add_argument("--json", metavar="FILE", help="also write the measurements and the fit here")
    eff.set_defaults(func=run_link_efficiency)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_link_efficiency(args: argparse.Namespace) -> int:
    """Per link rate, the dilation check at K = 1 (an all-to-all alone of 4 MiB per rank at the
    rate and at half of it); then one ``link_efficiency`` for the simulator, fitted on every
    link-bound measurement."""
    import json
    from pathlib import Path

    from lina.cluster.dilation_check import check_dilation
    from lina.sim.calibration.a2a_efficiency import fit_a2a_link_efficiency, link_bound

    rates = [r.strip() for r in args.links.split(",") if r.strip()]
    specs = [
        EmulateSpec(hosts=args.hosts, workers_per_host=args.workers_per_host, link_bps=parse_rate(r, field="--links"))
        for r in rates
    ]  # every rate checked before anything is built
    if not specs:
        raise LinaError("--links names no rate. Fix: give e.g. --links 100mbit,400mbit")
    netns.require_support(alternative=None)
    rows, checks = [], []
    print(f"all-to-all alone, 4 MiB per rank, {args.hosts} hosts x {args.workers_per_host} workers")
    for spec in specs:
        check = check_dilation(f"hosts={spec.hosts},link={spec.link},workers_per_host={spec.workers_per_host}", 1.0)
        found = check.to_dict()
        checks.append({"link": spec.link, **found})
        rows += link_bound(found)
        at1, at2 = check.at(1.0), check.at(2.0)
        verdict = "link-bound" if check.passes else "CPU-bound (the fraction falls >5% from half the rate)"
        print(
            f"  link {spec.link:>8s}: {at1.fraction:6.1%} of the link ({at1.seconds * 1e3:7.1f} ms), "
            f"{at2.fraction:6.1%} at half the rate; {verdict}"
        )
    efficiency = fit_a2a_link_efficiency(rows) if rows else None
    if efficiency is not None:
        print(
            f"simulator: link_efficiency = {efficiency:.3f} (ClusterSpec.link_efficiency; link-bound measurements only)"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"checks": checks, "link_efficiency": efficiency}, indent=2))
        print(f"wrote {args.json}")
    return 0


def run_up(args: argparse.Namespace) -> int:
    spec = EmulateSpec(
        hosts=args.hosts,
        link_bps=parse_rate(args.link, field="--link"),
        delay_us=parse_duration_us(args.delay, field="--delay"),
        workers_per_host=args.workers_per_host,
        queue_ms=parse_duration_us(args.queue, field="--queue") / 1e3,
        share=args.share,
    )
    cluster = EmulatedCluster(spec, alternative=None)
    cluster.up()
    cluster.detach()
    print(f"cluster {cluster.prefix} is up: {spec} (each host's link limited to {spec.link} each way)")
    for host in cluster.hosts:
        print(f"  host {host.index}: netns {host.netns}  ip {host.ip}  interface {host.ifname}")
    print(f"  switch: netns {cluster.switch_netns} (bridge {netns.BRIDGE})")
    h0 = cluster.hosts[0]
    print(
        f"run on host 0:  GLOO_SOCKET_IFNAME={h0.ifname} MASTER_ADDR={cluster.master_addr} ip netns exec "
        f"{h0.netns} <command>"
    )
    print(f"state: {state_dir() / (cluster.prefix + '.json')}; remove it with: lina cluster down")
    return 0


def run_status(args: argparse.Namespace) -> int:
    records = survey()
    if not records:
        print("no emulated clusters on this machine")
        return 0
    for rec in records:
        spec = rec.state.get("spec", "?") if rec.state else "? (no state file)"
        owner = ""
        if rec.state and rec.state.get("owner_pid") is not None:
            owner = f", owner pid {rec.state['owner_pid']}"
        print(f"{rec.prefix}  {rec.kind}{owner}  {spec}  ({len(rec.namespaces)} namespaces)")
        hosts = rec.state.get("hosts", []) if rec.state else []
        for host in hosts:
            present = host["netns"] in rec.namespaces
            rate = _shaped_rate(host["netns"], host["ifname"]) if present else None
            shaped = f"shaped to {rate / 1e6:g}mbit" if rate else "no shaping found"
            print(
                f"  host {host['index']}: {host['netns']}  {host['ip']}  {host['ifname']}  "
                f"{'present' if present else 'missing'}, {shaped if present else ''}".rstrip(", ")
            )
    stale = sum(r.kind == "stale" for r in records)
    if stale:
        print(f"{stale} stale cluster(s): remove with `lina cluster down --all`")
    return 0


def _shaped_rate(ns: str, ifname: str) -> int | None:
    """The shaped rate, or None when the namespace vanished meanwhile (a run ending as we look)."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return shaping.read_egress_rate(ns, ifname)
    except (OSError, NetlinkError):
        return None


def run_down(args: argparse.Namespace) -> int:
    records = survey()
    if records:
        netns.require_support(alternative=None)  # removing namespaces needs the same privileges
    if args.prefix:
        chosen = [r for r in records if r.prefix == args.prefix]
        if not chosen:
            raise LinaError(f"no cluster {args.prefix} here; `lina cluster status` lists them")
    elif args.all:
        chosen = records
    else:
        chosen = [r for r in records if r.kind == "detached"]
    removed = kept = 0
    for rec in chosen:
        if rec.kind == "running" and not args.force:
            print(f"kept {rec.prefix}: its owner (pid {rec.state['owner_pid']}) is running; --force removes it anyway")
            kept += 1
            continue
        deleted = remove_cluster(rec)
        print(f"removed {rec.prefix} ({rec.kind}): {len(deleted)} namespaces")
        removed += 1
    if not chosen:
        others = len(records)
        hint = f"; {others} other cluster(s) exist, see `lina cluster status` or use --all" if others else ""
        print("no cluster left up by `lina cluster up`" + hint)
    return 1 if kept and not removed and args.prefix else 0

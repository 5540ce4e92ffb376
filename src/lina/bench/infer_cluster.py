"""``lina bench infer --cluster NAME``: a named real cluster (:mod:`lina.cluster.presets`) as the
inference benchmark runs it on this machine.

The preset fixes the hosts, the workers per host (as many as this machine's cores hold), the host
and intra-host links (real-cluster units; emulated at rate / K), the device and the dilation K.
:func:`resolve_cluster` fills those into the parsed options, or the defaults without ``--cluster``,
and refuses contradicting options (:class:`~lina.errors.ConfigError`, exit 2) before any process
starts. :func:`cluster_regime` is what the report and the JSON say about the scaling.
"""

from __future__ import annotations

import argparse

from lina.cluster.presets import PRESETS, FittedCluster, fit_preset, require_device_time
from lina.cluster.spec import format_rate
from lina.errors import ConfigError

DEFAULTS = {"link": "100mbit", "hosts": 4, "workers_per_host": 2}  # without --cluster


def add_cluster_argument(p: argparse.ArgumentParser) -> None:
    """``--cluster NAME``."""
    p.add_argument(
        "--cluster",
        choices=sorted(PRESETS),
        help="emulate a named real cluster instead of --hosts/--workers-per-host/--link: paper = 4 hosts x 4 A100, "
        "100 Gb/s, NVLink inside (as many workers per host as this machine holds, compute a100 unless --compute "
        "names another device, the smallest dilation tc shapes and the start-up check passes)",
    )


def resolve_cluster(args: argparse.Namespace, cores: int | None = None) -> FittedCluster | None:
    """Fill ``args.hosts``, ``workers_per_host``, ``link``, ``intra_bps``, ``compute`` and ``dilation``.

    Without ``--cluster``: the defaults (``DEFAULTS``, real compute, dilation 1, no intra link).
    With it: the preset fitted to ``cores`` CPU cores (this machine's when None); ``--hosts``,
    ``--workers-per-host``, ``--link`` and ``--compute real`` contradict it (ConfigError). A given
    ``--dilation`` is kept (checked against tc's range); otherwise the preset's smallest is used
    and ``args.dilation_chosen_by_cluster`` lets the start-up check raise it.
    """
    args.dilation_chosen_by_cluster = False
    if not getattr(args, "cluster", None):
        for option, value in DEFAULTS.items():
            if getattr(args, option, None) is None:
                setattr(args, option, value)
        args.compute = args.compute or "real"
        args.dilation = 1.0 if args.dilation is None else args.dilation
        args.intra_bps = 0
        args.fitted_cluster = None
        return None
    for option in DEFAULTS:
        if getattr(args, option, None) is not None:
            flag = "--" + option.replace("_", "-")
            raise ConfigError(
                option.replace("_", "-"), f"--cluster {args.cluster} sets it", f"drop {flag}, or drop --cluster"
            )
    require_device_time(args.cluster, args.compute)
    args.dilation_chosen_by_cluster = args.dilation is None
    fitted = fit_preset(args.cluster, cores=cores, dilation=args.dilation)
    preset = fitted.preset
    args.hosts, args.workers_per_host = preset.hosts, fitted.workers_per_host
    args.link = format_rate(preset.link_bps)
    args.intra_bps = preset.intra_bps if fitted.workers_per_host > 1 else 0  # one worker per host: no intra traffic
    args.compute = args.compute or preset.device
    args.dilation = fitted.dilation
    args.fitted_cluster = fitted
    return fitted


def cluster_regime(fitted: FittedCluster | None, dilation: float) -> dict | None:
    """What ``--cluster`` ran as, for the JSON: the real cluster, the scaled one, rates in both units."""
    if fitted is None:
        return None
    p = fitted.preset
    return {
        "name": p.name,
        "real": f"{p.hosts} hosts x {p.devices_per_host} {p.device}",
        "source": p.source,
        "emulated": f"{p.hosts} hosts x {fitted.workers_per_host} worker{'s' if fitted.workers_per_host != 1 else ''}",
        "scaled_down": fitted.note,
        "link": format_rate(p.link_bps),
        "emulated_link": format_rate(int(p.link_bps / dilation)),
        "intra": format_rate(p.intra_bps),
        "emulated_intra": format_rate(int(p.intra_bps / dilation)) if fitted.workers_per_host > 1 else "unused",
    }


def cluster_lines(regime: dict | None) -> list[str]:
    """The report's lines about ``--cluster`` (none without it)."""
    if regime is None:
        return []
    lines = [f"cluster {regime['name']}: {regime['source']}"]
    if regime["scaled_down"]:
        lines.append(regime["scaled_down"])
    lines.append(
        f"host link {regime['link']} (emulated {regime['emulated_link']}), intra-host {regime['intra']} "
        f"(emulated {regime['emulated_intra']})"
    )
    return lines

"""Named real clusters to emulate (``--cluster paper``), fitted to this machine.

A :class:`ClusterPreset` is a real cluster in real units: hosts, accelerators per host, the
host link, the intra-host link, the device. :func:`fit_preset` turns it into what this machine
can run: fewer workers per host where its cores cannot hold one per accelerator (the worker count
is the one thing that changes; every rate stays the real cluster's), and a time dilation K that
brings every emulated rate (real / K) within what tc shapes (:class:`EmulateSpec`'s range).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from lina.cluster.spec import _MAX_RATE_BPS, EmulateSpec, format_rate, parse_emulate
from lina.errors import ConfigError


@dataclass(frozen=True)
class ClusterPreset:
    """A real cluster. Rates in bits/s, per direction.

    Args:
        name: what ``--cluster`` calls it.
        hosts: servers.
        devices_per_host: accelerators per server (one worker each when the machine holds them).
        link_bps: each server's network link.
        intra_bps: the link between the accelerators of one server (NVLink), shared.
        device: the accelerator (a name :func:`lina.devices.device_from` knows).
        source: where the description comes from.
    """

    name: str
    hosts: int
    devices_per_host: int
    link_bps: int
    intra_bps: int
    device: str
    source: str


PRESETS = {
    "paper": ClusterPreset(
        "paper",
        hosts=4,
        devices_per_host=4,
        link_bps=100 * 10**9,
        intra_bps=2400 * 10**9,  # NVLink 3 on an A100 server: 300 GB/s per direction
        device="a100",
        source="Lina (USENIX ATC'23) testbed: 4 servers x 4 A100, 100 Gb/s between servers, NVLink inside",
    ),
}


@dataclass(frozen=True)
class FittedCluster:
    """A preset as this machine runs it.

    Args:
        preset: the real cluster.
        workers_per_host: workers per emulated host (``preset.devices_per_host`` or fewer).
        dilation: time dilation K (device times x K, emulated rates = real / K).
        emulate: the ``--emulate`` text, rates in real-cluster units (parse it with the dilation).
        note: why the worker count is smaller than the preset's (None when it is not).
    """

    preset: ClusterPreset
    workers_per_host: int
    dilation: float
    emulate: str
    note: str | None

    @property
    def workers(self) -> int:
        return self.preset.hosts * self.workers_per_host

    def spec(self) -> EmulateSpec:
        """The emulated cluster (rates divided by the dilation)."""
        return parse_emulate(self.emulate, self.dilation)


def smallest_dilation(fastest_bps: int) -> float:
    """The smallest K in 1, 2, 5, 10, 20, 50, ... with ``fastest_bps / K`` within tc's range."""
    k = 1.0
    while fastest_bps / k > _MAX_RATE_BPS:
        decade = 10 ** math.floor(math.log10(k))
        k = next(m * decade for m in (2, 5, 10) if m * decade > k)
    return k


def require_device_time(name: str, compute: str | None) -> None:
    """ConfigError when ``--cluster NAME`` is asked for real compute: its rates need a dilation,
    and a dilation needs device-time compute."""
    if compute == "real":
        raise ConfigError(
            "compute",
            f"the {name} cluster's links are faster than tc shapes, so it runs under time dilation, which needs "
            "device-time compute",
            f"drop --compute real (the {name} cluster computes as {PRESETS[name].device if name in PRESETS else 'its device'})",
        )


def fit_preset(name: str, cores: int | None = None, dilation: float | None = None) -> FittedCluster:
    """``--cluster NAME`` on a machine with ``cores`` CPU cores (this one's when None).

    One worker per core, at least one per host and at most one per accelerator; the dilation is
    ``dilation`` when given (checked: every emulated rate must stay within tc's range) or the
    smallest that brings the fastest link within it.
    """
    if name not in PRESETS:
        raise ConfigError("cluster", f"{name!r} is not a cluster I know", f"use one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    cores = (os.cpu_count() or 1) if cores is None else cores
    wph = max(1, min(preset.devices_per_host, cores // preset.hosts))
    note = None
    if wph < preset.devices_per_host:
        note = (
            f"the {name} cluster has {preset.hosts} hosts x {preset.devices_per_host} {preset.device}; this machine has "
            f"{cores} CPU core{'s' if cores != 1 else ''}, so it runs {preset.hosts} hosts x {wph} worker"
            f"{'s' if wph != 1 else ''} (rates stay the real cluster's)"
        )
    fastest = max(preset.link_bps, preset.intra_bps)
    if dilation is None:
        dilation = smallest_dilation(fastest)
    elif not dilation > 0 or fastest / dilation > _MAX_RATE_BPS:
        need = smallest_dilation(fastest)
        raise ConfigError(
            "dilation",
            f"{dilation:g} leaves the {name} cluster's {format_rate(fastest)} link at {format_rate(int(fastest / dilation))}"
            if dilation > 0
            else f"{dilation} must be > 0",
            f"use --dilation {need:g} or more (tc shapes at most {format_rate(_MAX_RATE_BPS)})",
        )
    emulate = (
        f"hosts={preset.hosts},link={format_rate(preset.link_bps)},intra={format_rate(preset.intra_bps)},"
        f"workers_per_host={wph}"
    )
    fitted = FittedCluster(preset, wph, float(dilation), emulate, note)
    fitted.spec()  # validates the emulated rates
    return fitted

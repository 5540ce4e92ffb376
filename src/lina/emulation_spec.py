"""What an emulated cluster is: :class:`EmulateSpec` and the ``--emulate`` grammar
(``hosts=4,link=200mbit,delay=50us,workers_per_host=1,intra=off``), with the rate and duration
parsers and the one-line description reports print.

Pure: no namespaces, no processes. :mod:`lina.config` validates a run's emulated cluster with it
before any worker starts; :mod:`lina.cluster.lifecycle` builds the cluster, and
:mod:`lina.cluster.spec` / :mod:`lina.cluster.emulate` re-export these names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lina.errors import ConfigError

#: how a link is shared between peer hosts (:mod:`lina.cluster.shaping` shapes each)
SHARES = ("peer", "fifo")
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_TIME_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}
_MAX_RATE_BPS = 32 * 10**9  # tbf's rate field is 32-bit bytes/s
_KEYS = ("hosts", "link", "delay", "workers_per_host", "queue", "share", "intra")


def parse_rate(text: str, field: str = "emulate.link") -> int:
    """``"200mbit"`` -> 200_000_000 (bits/s). Units: bit, kbit, mbit, gbit (decimal, like tc)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in _RATE_UNITS:
        raise ConfigError(field, f"{text!r} is not a rate", "write a number and a unit, e.g. 200mbit, 500kbit or 1gbit")
    return int(round(float(match.group(1)) * _RATE_UNITS[match.group(2)]))


def format_rate(bps: int) -> str:
    """200_000_000 -> ``"200mbit"`` (the largest unit that keeps it whole)."""
    for unit in ("gbit", "mbit", "kbit"):
        if bps % _RATE_UNITS[unit] == 0:
            return f"{bps // _RATE_UNITS[unit]}{unit}"
    return f"{bps}bit"


def parse_duration_us(text: str, field: str = "emulate.delay") -> float:
    """``"50us"`` -> 50.0, ``"1.5ms"`` -> 1500.0, ``"0"`` -> 0.0 (microseconds)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", text.lower())
    unit = match.group(2) if match else None
    if match and unit == "" and float(match.group(1)) == 0:
        return 0.0
    if not match or unit not in _TIME_UNITS:
        raise ConfigError(field, f"{text!r} is not a duration", "write a number and a unit, e.g. 50us, 2ms or 0")
    return float(match.group(1)) * _TIME_UNITS[unit]


@dataclass(frozen=True)
class EmulateSpec:
    """What to emulate: ``hosts`` hosts, each with ``workers_per_host`` workers and one link.

    Args:
        hosts: number of emulated hosts (network namespaces), 2..250.
        link_bps: each host's link rate in bits/s, applied to upload and download separately.
        delay_us: one-way host-to-host latency in microseconds (0: none; needs netem), split
            evenly between the host side and the switch side of each link.
        workers_per_host: worker processes per host (they talk over the host's loopback).
        queue_ms: how much traffic (in ms at the link rate) the link's queue holds before it
            drops. Deep by default: a drop stalls a TCP flow for a retransmission timeout
            (>= 200 ms), which a lossless fabric (InfiniBand, NVLink) never does. At 200mbit
            with 4 hosts, a 5 ms queue dropped 5% of packets in the contention benchmark and
            tripled the slowdown; 50 ms and 100 ms dropped none.
        share: how a link is shared. ``peer`` (default): round-robin between peer hosts
            (an htb class per peer), so two busy peers get half each, whatever TCP does;
            flows to one peer share a FIFO. ``fifo``: one FIFO per direction, like a
            switch port, where TCP alone decides the split (unevenly, with deep queues).
        intra_bps: the intra-host link (NVLink in a GPU node) in bits/s, shared by all traffic
            between the workers of one host (one token bucket on the host's loopback); 0
            (default): unlimited loopback.
    """

    hosts: int = 4
    link_bps: int = 200 * 10**6
    delay_us: float = 0.0
    workers_per_host: int = 1
    queue_ms: float = 100.0
    share: str = "peer"
    intra_bps: int = 0

    def __post_init__(self):
        if not isinstance(self.hosts, int) or not 2 <= self.hosts <= 250:
            raise ConfigError("emulate.hosts", f"{self.hosts!r} hosts", "use between 2 and 250 hosts")
        if not isinstance(self.link_bps, int) or not 100_000 <= self.link_bps <= _MAX_RATE_BPS:
            raise ConfigError(
                "emulate.link", f"{self.link_bps!r} bit/s is out of range", "use a rate between 100kbit and 32gbit"
            )
        if self.delay_us < 0 or self.delay_us > 10_000_000:
            raise ConfigError("emulate.delay", f"{self.delay_us}us", "use a delay between 0 and 10s")
        if 0 < self.delay_us < 2:
            raise ConfigError(
                "emulate.delay", f"{self.delay_us}us is below netem's resolution", "use 0 or at least 2us"
            )
        if not isinstance(self.workers_per_host, int) or self.workers_per_host < 1:
            raise ConfigError(
                "emulate.workers_per_host", f"{self.workers_per_host!r}", "use 1 or more workers per host"
            )
        if not 1 <= self.queue_ms <= 10_000:
            raise ConfigError("emulate.queue", f"{self.queue_ms}ms", "use a queue between 1ms and 10s")
        if self.share not in SHARES:
            raise ConfigError("emulate.share", f"{self.share!r}", "use share=peer or share=fifo")
        if not isinstance(self.intra_bps, int) or not (
            self.intra_bps == 0 or 100_000 <= self.intra_bps <= _MAX_RATE_BPS
        ):
            raise ConfigError(
                "emulate.intra",
                f"{self.intra_bps!r} bit/s is out of range",
                "use a rate between 100kbit and 32gbit (raise the dilation for a faster real link), or intra=off",
            )

    @property
    def world_size(self) -> int:
        return self.hosts * self.workers_per_host

    @property
    def link(self) -> str:
        return format_rate(self.link_bps)

    @property
    def intra(self) -> str:
        """The intra-host link's rate, or ``off`` (free loopback)."""
        return format_rate(self.intra_bps) if self.intra_bps else "off"

    def __str__(self) -> str:
        parts = [f"hosts={self.hosts}", f"link={self.link}"]
        if self.delay_us:
            parts.append(f"delay={self.delay_us:g}us")
        parts.append(f"workers_per_host={self.workers_per_host}")
        if self.queue_ms != EmulateSpec.queue_ms:
            parts.append(f"queue={self.queue_ms:g}ms")
        if self.share != EmulateSpec.share:
            parts.append(f"share={self.share}")
        if self.intra_bps:
            parts.append(f"intra={self.intra}")
        return ",".join(parts)


def parse_emulate(text: str, dilation: float = 1.0) -> EmulateSpec | None:
    """Parse ``"hosts=4,link=200mbit,delay=50us,workers_per_host=1"``; ``"none"`` -> None (plain loopback).

    Keys (all optional, defaults from :class:`EmulateSpec`): hosts, link, delay,
    workers_per_host (or workers-per-host), queue, share, intra (the intra-host link; ``off``, the
    default, leaves loopback free). With time ``dilation`` K the rates are the real cluster's: the
    emulated links run at link / K and intra / K, and the delay is K times longer.
    """
    text = text.strip()
    if text.lower() in ("none", "off", ""):
        return None
    values: dict = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in _KEYS:
            raise ConfigError(
                "emulate",
                f"{item.strip()!r} is not a key=value pair I know",
                "write e.g. hosts=4,link=200mbit,delay=50us,workers_per_host=1 (keys: "
                + ", ".join(_KEYS)
                + "), or none",
            )
        if key in ("hosts", "workers_per_host"):
            try:
                values[key] = int(value)
            except ValueError:
                raise ConfigError(f"emulate.{key}", f"{value!r} is not a whole number", f"write e.g. {key}=4") from None
        elif key == "link":
            values["link_bps"] = int(parse_rate(value) / dilation)
        elif key == "intra":
            off = value.strip().lower() in ("off", "none", "0")
            values["intra_bps"] = 0 if off else int(parse_rate(value, field="emulate.intra") / dilation)
        elif key == "delay":
            values["delay_us"] = parse_duration_us(value) * dilation
        elif key == "share":
            values["share"] = value.strip()
        else:
            values["queue_ms"] = parse_duration_us(value, field="emulate.queue") / 1e3
    return EmulateSpec(**values)


def describe(spec: EmulateSpec, dilation: float = 1.0) -> str:
    """One line for reports: hosts, workers and each link's rate in real-cluster units, with the
    emulated rate beside it under time dilation (``link 100gbit (emulated 1gbit)``)."""

    def rate(bps: int) -> str:
        if not bps:
            return "off (free loopback)"
        real = format_rate(int(round(bps * dilation / 1000)) * 1000)
        return real if dilation == 1.0 else f"{real} (emulated {format_rate(bps)})"

    workers = f"{spec.workers_per_host} worker{'s' if spec.workers_per_host != 1 else ''}"
    text = f"{spec.hosts} hosts x {workers}, host link {rate(spec.link_bps)} up and down"
    text += f", intra-host link {rate(spec.intra_bps)}"
    return text + (f", time dilation x{dilation:g}" if dilation != 1.0 else "")

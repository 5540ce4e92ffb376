"""Accelerators as the simulator and the device-time compute mode both see them: one source.

A :class:`DeviceSpec` is a roofline: a kernel takes ``max(FLOPs / sustained FLOP/s, bytes /
sustained memory bandwidth)``. Named devices are in :data:`DEVICES` (short aliases in
:data:`ALIASES`); :func:`device_from` also reads a TOML description file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lina.errors import ConfigError


def require_positive(obj, *names: str) -> None:
    """ConfigError unless each attribute ``names`` of ``obj`` is a number above 0."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(name, f"must be a positive number, got {value!r}", f"set {name} above 0")


@dataclass(frozen=True)
class DeviceSpec:
    """An accelerator: peak matmul rate, memory bandwidth, the fraction of both a kernel reaches."""

    name: str
    peak_tflops: float
    mem_bw_gbs: float
    efficiency: float = 0.4
    mem_efficiency: float = 0.7
    mem_gb: float = 80.0

    def __post_init__(self):
        require_positive(self, "peak_tflops", "mem_bw_gbs", "efficiency", "mem_efficiency", "mem_gb")
        for name in ("efficiency", "mem_efficiency"):
            if getattr(self, name) > 1:
                raise ConfigError(name, f"{getattr(self, name)} is above 1", "use a fraction in (0, 1]")

    @property
    def flops(self) -> float:
        """Sustained FLOP/s of a large matmul."""
        return self.peak_tflops * 1e12 * self.efficiency

    @property
    def mem_bytes_per_s(self) -> float:
        return self.mem_bw_gbs * 1e9 * self.mem_efficiency


DEVICES = {
    "a100-40gb-tf32": DeviceSpec("a100-40gb-tf32", peak_tflops=156.0, mem_bw_gbs=1555.0, efficiency=0.25, mem_gb=40.0),
    "a100-80gb-bf16": DeviceSpec("a100-80gb-bf16", peak_tflops=312.0, mem_bw_gbs=2039.0, efficiency=0.45, mem_gb=80.0),
    "h100-sxm-bf16": DeviceSpec("h100-sxm-bf16", peak_tflops=989.0, mem_bw_gbs=3350.0, efficiency=0.4, mem_gb=80.0),
    "h200-sxm-bf16": DeviceSpec("h200-sxm-bf16", peak_tflops=989.0, mem_bw_gbs=4800.0, efficiency=0.4, mem_gb=141.0),
}

#: short names users type (``--compute a100``)
ALIASES = {"a100": "a100-80gb-bf16", "h100": "h100-sxm-bf16", "h200": "h200-sxm-bf16"}


def device_from(text: str) -> DeviceSpec:
    """A named device (:data:`DEVICES` or :data:`ALIASES`) or a TOML file with the fields of
    :class:`DeviceSpec` at top level or in a ``[device]`` table."""
    name = ALIASES.get(text, text)
    if name in DEVICES:
        return DEVICES[name]
    path = Path(text)
    known = ", ".join([*ALIASES, *DEVICES])
    if not path.is_file():
        raise ConfigError(
            "compute",
            f"{text!r} is neither a known device nor a device description file",
            f"use one of {known}, or a .toml file with name, peak_tflops and mem_bw_gbs",
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("compute", f"{path} is not valid TOML ({err})", "fix the syntax of the device file") from None
    data = data.get("device", data)
    allowed = {f.name for f in fields(DeviceSpec)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            "compute", f"{path}: unknown key(s) {', '.join(unknown)}", f"use only {', '.join(sorted(allowed))}"
        )
    try:
        return DeviceSpec(**{"name": path.stem, **data})
    except TypeError as err:
        raise ConfigError("compute", f"{path}: {err}", "give at least peak_tflops and mem_bw_gbs") from None


def check_compute_mode(compute: str, dilation: float) -> None:
    """Refuse a compute mode and dilation that do not go together: a dilation below 1, a dilation
    with real compute, or an unknown device (:class:`ConfigError`, before any process starts)."""
    if not dilation >= 1:
        raise ConfigError("dilation", f"{dilation} is below 1", "use --dilation 1 or more, e.g. 50")
    if compute == "real" and dilation != 1.0:
        raise ConfigError(
            "dilation", "time dilation needs a device-time compute mode", "add --compute a100, or drop --dilation"
        )
    if compute != "real":
        device_from(compute)

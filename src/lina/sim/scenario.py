"""A scenario: one cluster, one model, how compute is costed, training options, policies.

Scenarios are built in (:mod:`lina.sim.scenarios`) or read from TOML (:func:`load_toml`)::

    name = "my-cluster"
    description = "what I plan to book"
    policies = ["ddp-overlap", "lina", "lina+packing"]   # optional
    device = "h100-sxm-bf16"                           # or a [device] table
    [cluster]
    hosts = 64
    gpus_per_host = 8
    link_gbps = 400
    nics_per_host = 8
    [model]
    name = "moe-gpt"
    layers = 32
    d_model = 4096
    d_ff = 14336
    experts = 64
    top_k = 2
    seq_len = 4096
    batch_size = 1
    [train]          # optional
    chunk_mb = 30
    a2a_skew = 1.3   # uneven routing: the busiest rank's all-to-all bytes over the mean's
    [profile]        # optional: measured costs instead of the device roofline
    dense_fwd_s_per_token = 1e-6
    ...
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import tomllib

from lina.errors import ConfigError
from lina.policy import BENCH_POLICIES, canonical_policy_name, train_policy
from lina.sim.compute import ComputeProfile
from lina.sim.spec import DEVICES, ClusterSpec, DeviceSpec, ModelSpec, TrainSpec, spec_from_dict


@dataclass(frozen=True)
class Scenario:
    """Everything one ``lina sim`` training run needs.

    Exactly one of ``device`` (roofline costs) and ``profile`` (measured costs) is used; the
    profile wins when both are given. ``experts_follow_gpus``: in a GPU-count sweep, keep
    experts equal to GPUs (the paper's setting) instead of a fixed expert count.
    """

    name: str
    description: str
    cluster: ClusterSpec
    model: ModelSpec
    device: DeviceSpec | None = None
    profile: ComputeProfile | None = None
    train: TrainSpec = field(default_factory=TrainSpec)
    policies: tuple[str, ...] = BENCH_POLICIES
    experts_follow_gpus: bool = False

    def __post_init__(self):
        if self.device is None and self.profile is None:
            raise ConfigError(
                "device",
                "neither a device nor a measured profile is given",
                'add device = "<name>" or a [profile] table',
            )
        for p in self.policies:
            train_policy(p)

    @property
    def gpus(self) -> int:
        return self.cluster.gpus

    def compute_profile(self) -> ComputeProfile:
        if self.profile is not None:
            return self.profile
        return ComputeProfile.from_device(self.device, self.model)

    def with_hosts(self, hosts: int) -> "Scenario":
        """The same scenario on ``hosts`` hosts (experts follow GPUs when the scenario says so)."""
        cluster = replace(self.cluster, hosts=hosts)
        model = self.model
        if self.experts_follow_gpus:
            model = replace(model, experts=cluster.gpus)
        return replace(self, name=f"{self.name}@{cluster.gpus}gpu", cluster=cluster, model=model)

    def with_link(self, gbps: float) -> "Scenario":
        return replace(self, name=f"{self.name}@{gbps:g}G", cluster=replace(self.cluster, link_gbps=gbps))

    def with_policies(self, policies: tuple[str, ...]) -> "Scenario":
        return replace(self, policies=tuple(canonical_policy_name(p) for p in policies))


def _device(value) -> DeviceSpec:
    if isinstance(value, str):
        if value not in DEVICES:
            raise ConfigError(
                "device", f"unknown device {value!r}", f"use one of {', '.join(DEVICES)} or a [device] table"
            )
        return DEVICES[value]
    if isinstance(value, dict):
        return spec_from_dict(DeviceSpec, value, "device")
    raise ConfigError(
        "device", f"expected a name or a table, got {type(value).__name__}", 'write device = "h100-sxm-bf16"'
    )


def scenario_from_dict(data: dict, default_name: str = "config") -> Scenario:
    """Build a scenario from a parsed TOML document (see module docstring)."""
    known = {"name", "description", "policies", "device", "cluster", "model", "train", "profile", "experts_follow_gpus"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(unknown[0], "is not a known top-level setting", f"use some of: {', '.join(sorted(known))}")
    for section in ("cluster", "model"):
        if section not in data:
            raise ConfigError(f"[{section}]", "is missing", f"add a [{section}] table")
    cluster = spec_from_dict(ClusterSpec, data["cluster"], "cluster")
    model = spec_from_dict(ModelSpec, {"name": data.get("name", default_name), **data["model"]}, "model")
    train = spec_from_dict(TrainSpec, data.get("train", {}), "train")
    device = _device(data["device"]) if "device" in data else None
    profile = ComputeProfile.from_dict(data["profile"]) if "profile" in data else None
    return Scenario(
        name=data.get("name", default_name),
        description=data.get("description", "from a config file"),
        cluster=cluster,
        model=model,
        device=device,
        profile=profile,
        train=train,
        policies=tuple(canonical_policy_name(p) for p in data.get("policies", BENCH_POLICIES)),
        experts_follow_gpus=bool(data.get("experts_follow_gpus", False)),
    )


def load_toml(path: str | Path) -> Scenario:
    """Read a scenario from a TOML file; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"{path} does not exist", "give the path of a TOML scenario file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("--config", f"{path} is not valid TOML ({err})", "fix the file's syntax") from err
    return scenario_from_dict(data, default_name=path.stem)

"""Compute costs of one device: measured (a profile) or derived from a device description.

A :class:`ComputeProfile` holds per-token costs, so one profile serves any batch:

- ``dense_*``: non-expert work of one transformer layer (attention, norms, gate) per token,
  plus ``layer_fwd_s`` / ``layer_bwd_s`` per layer and pass whatever the tokens (framework
  overheads: launches, Python; they matter when a device has few tokens);
- ``expert_*``: one expert FFN per routed token, with ``expert_min_s`` the least time one
  expert invocation takes however few tokens it gets (its weights must be read);
- ``head_*``: embedding and LM head per token, once per step;
- ``optimizer_s_per_param``: the optimizer step, per parameter held by the device;
- ``slowdown_in_a2a`` / ``slowdown_in_allreduce``: the share of compute speed lost while an
  all-to-all (or, with none running, an allreduce) is in flight on the device. 0 for GPUs, whose
  collectives run on their own engines; above 0 where collectives share the compute's CPU cores
  (the emulated cluster; fitted by ``lina sim --calibrate``);
- ``allreduce_slowdown_in_compute``: the share of an allreduce's speed lost while the device
  computes beside it (the other way round: compute and collectives share CPU cores); 0 for GPUs;
- ``loopback_slowdown_in_compute``: the same for all-to-all bytes between ranks of one host
  (loopback copies are CPU work too); 0 for GPUs;
- ``straggler``: how much longer than the mean the slowest device computes between two
  synchronizing collectives (every device then waits for it); 0 when devices run in lockstep.

Backward costs are separate (usually about twice the forward).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from lina.errors import ConfigError
from lina.sim.spec import DeviceSpec, ModelSpec


@dataclass(frozen=True)
class ComputeProfile:
    dense_fwd_s_per_token: float
    dense_bwd_s_per_token: float
    expert_fwd_s_per_token: float
    expert_bwd_s_per_token: float
    expert_min_s: float = 0.0
    head_fwd_s_per_token: float = 0.0
    head_bwd_s_per_token: float = 0.0
    optimizer_s_per_param: float = 0.0
    slowdown_in_a2a: float = 0.0
    slowdown_in_allreduce: float = 0.0
    straggler: float = 0.0
    layer_fwd_s: float = 0.0
    layer_bwd_s: float = 0.0
    allreduce_slowdown_in_compute: float = 0.0
    loopback_slowdown_in_compute: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if "slowdown" in f.name:
                if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                    raise ConfigError(
                        f.name, f"must be a share in [0, 1), got {value!r}", "give the share of speed lost, e.g. 0.2"
                    )
            elif not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(
                    f.name, f"must be a time of 0 s or more, got {value!r}", "give seconds as a number >= 0"
                )

    def compute_rate(self, a2a_in_flight: bool, allreduce_in_flight: bool) -> float:
        """Compute speed of the step's slowest device (1 = full, lockstep) while the named
        collectives are in flight."""
        pace = 1.0 / (1.0 + self.straggler)
        if a2a_in_flight:
            return pace * (1.0 - self.slowdown_in_a2a)
        if allreduce_in_flight:
            return pace * (1.0 - self.slowdown_in_allreduce)
        return pace

    def dense_time(self, tokens: float, backward: bool = False) -> float:
        """Seconds of one layer's non-expert work on ``tokens`` tokens."""
        if backward:
            return self.layer_bwd_s + self.dense_bwd_s_per_token * tokens
        return self.layer_fwd_s + self.dense_fwd_s_per_token * tokens

    def expert_time(self, tokens: float, backward: bool = False) -> float:
        """Seconds one expert takes on ``tokens`` routed tokens (0 tokens: 0 s)."""
        if tokens <= 0:
            return 0.0
        per_token = self.expert_bwd_s_per_token if backward else self.expert_fwd_s_per_token
        floor = self.expert_min_s * (2.0 if backward else 1.0)
        return max(tokens * per_token, floor)

    def experts_time(self, tokens_per_expert: float, experts: int, backward: bool = False) -> float:
        """Seconds for ``experts`` co-located experts, each with ``tokens_per_expert`` tokens."""
        return experts * self.expert_time(tokens_per_expert, backward)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ComputeProfile":
        """From measured numbers, per token (keys of this class) or per layer for ``tokens``.

        Per-layer form: ``{"tokens": T, "dense_fwd_s": .., "dense_bwd_s": .., "head_fwd_s": ..,
        "head_bwd_s": .., "expert_fwd_s_per_token": .., "expert_bwd_s_per_token": ..,
        "expert_min_s": .., "optimizer_s_per_param": ..}`` where the ``*_s`` times are for ``T`` tokens.
        """
        data = dict(data)
        tokens = data.pop("tokens", None)
        for key in ("dense_fwd_s", "dense_bwd_s", "head_fwd_s", "head_bwd_s"):
            if key in data:
                if not tokens:
                    raise ConfigError(
                        "tokens", f"{key} is per layer but no token count is given", "add tokens = <tokens per device>"
                    )
                data[key + "_per_token"] = data.pop(key) / tokens
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"profile.{unknown[0]}", "is not a known cost", f"use some of: {', '.join(sorted(known))}"
            )
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError("profile", str(err), "give dense_fwd/bwd and expert_fwd/bwd costs") from err

    @classmethod
    def from_device(cls, device: DeviceSpec, model: ModelSpec) -> "ComputeProfile":
        """Roofline estimate: matmul FLOPs at ``device.flops``, weight reads at memory bandwidth.

        Forward FLOPs per token: dense layer ``8 d^2`` (QKV and output projections)
        ``+ 4 s d`` (scores and weighted sum over ``s`` positions) ``+ 2 d E`` (gate); expert
        ``4 d f``; head ``2 d V``. Backward is twice the forward. An expert call reads its
        ``2 d f`` weights at least once. The optimizer (Adam, mixed precision) moves about 16
        bytes per local parameter.
        """
        d, f = model.d_model, model.d_ff
        flops = device.flops
        dense = (8 * d * d + 4 * model.seq_len * d + 2 * d * model.experts) / flops
        expert = 4 * d * f / flops
        head = 2 * d * model.vocab / flops
        expert_min = 2 * d * f * model.param_bytes / device.mem_bytes_per_s
        return cls(
            dense_fwd_s_per_token=dense,
            dense_bwd_s_per_token=2 * dense,
            expert_fwd_s_per_token=expert,
            expert_bwd_s_per_token=2 * expert,
            expert_min_s=expert_min,
            head_fwd_s_per_token=head,
            head_bwd_s_per_token=2 * head,
            optimizer_s_per_param=16 / device.mem_bytes_per_s,
        )

"""Typed configuration for models and training runs.

Configs are dataclasses, loadable from TOML and overridable from the command line, and validated
before any worker starts: every problem raises :class:`lina.errors.ConfigError` naming the field
and the fix.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lina.errors import ConfigError

SCHEDULES = ("deepspeed", "sequential", "tutel", "lina")


@dataclass
class ModelConfig:
    """Shape of the MoE GPT. Every ``moe_interval``-th FFN is an MoE layer (1 = every FFN)."""

    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    experts: int = 4
    top_k: int = 2
    moe_interval: int = 1
    capacity_factor: float = 0.0  # <= 0 is rejected; use dropless = true for no capacity
    dropless: bool = True
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    gate_noise: float = 0.0
    # A Hugging Face checkpoint folder to train instead of the built-in GPT (see lina.hf); its
    # config.json fixes experts, top_k, widths, depth and vocabulary. "" = the built-in GPT.
    hf_model: str = ""
    # The built-in GPT's MoE parts (lina.moe.spec): expert FFN "gelu" or "swiglu"; a shared SwiGLU
    # expert of this width beside the routed ones (0 = none); the first N FFNs dense.
    expert: str = "gelu"
    shared_expert_d_ff: int = 0
    first_k_dense: int = 0

    def moe_spec(self):
        """The :class:`lina.moe.spec.MoESpec` of these settings (the default: lina's own layer)."""
        from lina.moe.spec import ExpertSpec, MoESpec, SharedExpertSpec

        return MoESpec(expert=ExpertSpec(self.expert), shared=SharedExpertSpec(d_ff=self.shared_expert_d_ff))

    def validate(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "d_ff", "experts", "moe_interval"):
            _positive_int(f"model.{name}", getattr(self, name))
        if self.d_model % self.n_heads:
            raise ConfigError("model.d_model", f"{self.d_model} is not divisible by n_heads={self.n_heads}", "choose d_model as a multiple of n_heads")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError("model.top_k", f"{self.top_k!r} must be a positive integer", "use --top-k 1 or 2")
        if self.top_k > self.experts:
            raise ConfigError("model.top_k", f"top-k {self.top_k} exceeds the number of experts {self.experts}", f"use --top-k <= {self.experts} or more --experts")
        if not self.dropless and not self.capacity_factor > 0:
            raise ConfigError("model.capacity_factor", f"{self.capacity_factor} must be > 0 when routing is not dropless", "set capacity_factor to e.g. 1.25, or dropless = true")
        if self.gate_noise < 0:
            raise ConfigError("model.gate_noise", f"{self.gate_noise} is negative", "use 0 (off) or a small positive value such as 0.01")
        for name in ("balance_loss_weight", "z_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name}", "is negative", "use 0 to turn it off or a small positive weight")
        if self.expert not in ("gelu", "swiglu"):
            raise ConfigError("model.expert", f"unknown expert FFN {self.expert!r}", "use gelu or swiglu")
        for name in ("shared_expert_d_ff", "first_k_dense"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"model.{name}", f"{getattr(self, name)!r} must be an integer >= 0",
                                  "use 0 (off) or a positive integer")
        if not any(self.is_moe(i) for i in range(self.n_layers)):
            raise ConfigError("model.first_k_dense", f"no MoE layer is left among {self.n_layers} layers",
                              f"use first_k_dense < {self.n_layers} or a smaller moe_interval")

    def is_moe(self, layer: int) -> bool:
        """Whether FFN ``layer`` (0-based) is an MoE layer: after the first ``first_k_dense``,
        every ``moe_interval``-th one."""
        return layer >= self.first_k_dense and layer % self.moe_interval == self.moe_interval - 1


@dataclass
class TrainConfig:
    """A training run. ``ep_size`` 0 means: expert-parallel over all workers."""

    model: ModelConfig = field(default_factory=ModelConfig)
    workers: int = 4
    ep_size: int = 0
    steps: int = 200
    batch_size: int = 8  # sequences per worker per step
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0
    schedule: str = "deepspeed"
    bucket_mb: float = 25.0
    chunk_mb: str = "auto"  # lina partition size in MB, or "auto"
    pipeline_chunks: int = 2  # all-to-all micro-ops per MoE layer for tutel / lina
    credit: int = 1  # lina: allreduce micro-ops in flight at once
    corpus: str = ""  # "" = the Python standard library's own source files
    corpus_max_mb: float = 3.0
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50
    log_every: int = 10
    out: str = "runs/train"
    resume: bool = False
    trace: str = ""  # folder for the timeline (Chrome trace, breakdown, plot); "" = off
    emulate: str = "none"
    timeout_s: float = 120.0  # collective timeout: a dead peer ends the job after at most this
    # Expert packing (see lina.train.packing): "off" (the layout of ep_size), "auto" (the controller
    # doubles experts per rank while FFN time per micro-op < all-to-all time per micro-op), "N" (N
    # experts per rank from the start) or "N@S" (N experts per rank from step S on).
    packing: str = "off"
    packing_first_step: int = 10  # auto: first decision before this step
    packing_every: int = 4  # auto: re-checked every this many steps
    max_expert_memory_mb: float = 0.0  # device memory for expert training state; 0 = unlimited

    @property
    def resolved_ep_size(self) -> int:
        return self.ep_size or self.workers

    def validate(self) -> None:
        self.model.validate()
        _positive_int("workers", self.workers)
        _positive_int("steps", self.steps)
        _positive_int("batch_size", self.batch_size)
        if not isinstance(self.ep_size, int) or self.ep_size < 0:
            raise ConfigError("ep_size", f"{self.ep_size!r} must be 0 (all workers) or a positive integer", "use 0 or a divisor of workers")
        ep = self.resolved_ep_size
        if self.workers % ep:
            raise ConfigError("ep_size", f"{ep} does not divide workers={self.workers}", "choose an EP size that divides the worker count")
        if self.model.experts % ep:
            raise ConfigError("experts", f"{self.model.experts} experts cannot be sharded evenly over an expert-parallel group of {ep} workers", f"use a multiple of {ep} experts (e.g. --experts {ep * max(1, self.model.experts // ep)}) or change --workers")
        if self.schedule not in SCHEDULES:
            raise ConfigError("schedule", f"unknown schedule {self.schedule!r}", f"use one of {', '.join(SCHEDULES)}")
        if not self.lr > 0:
            raise ConfigError("lr", f"{self.lr} must be > 0", "use e.g. 3e-3")
        if self.bucket_mb <= 0:
            raise ConfigError("bucket_mb", f"{self.bucket_mb} must be > 0", "use e.g. 25")
        if self.chunk_mb != "auto":
            try:
                value = float(self.chunk_mb)
            except ValueError:
                value = -1.0
            if not value > 0:
                raise ConfigError("chunk_mb", f"{self.chunk_mb!r} is neither 'auto' nor a positive number", "use --chunk-mb auto or e.g. --chunk-mb 1")
        _positive_int("pipeline_chunks", self.pipeline_chunks)
        _positive_int("credit", self.credit)
        for name in ("eval_every", "eval_batches", "checkpoint_every", "log_every"):
            _positive_int(name, getattr(self, name))
        if self.corpus and not Path(self.corpus).exists():
            raise ConfigError("corpus", f"path {self.corpus!r} does not exist", "pass an existing text file or folder, or leave --corpus empty for the built-in Python-source corpus")
        if self.corpus_max_mb <= 0:
            raise ConfigError("corpus_max_mb", f"{self.corpus_max_mb} must be > 0", "use e.g. 3")
        if self.timeout_s <= 0:
            raise ConfigError("timeout_s", f"{self.timeout_s} must be > 0", "use e.g. 120")
        self._validate_packing()
        spec = self.emulate_spec()
        if spec is not None and spec.world_size != self.workers:
            raise ConfigError("workers", f"{self.workers} workers but the emulated cluster has {spec.hosts} hosts x {spec.workers_per_host} workers", f"use --workers {spec.world_size} or change --emulate")

    def _validate_packing(self) -> None:
        from lina.train.packing import parse_packing, valid_experts_per_rank

        spec = parse_packing(self.packing)
        _positive_int("packing_first_step", self.packing_first_step)
        _positive_int("packing_every", self.packing_every)
        if self.max_expert_memory_mb < 0:
            raise ConfigError("max_expert_memory_mb", f"{self.max_expert_memory_mb} is negative", "use 0 (unlimited) or a budget in MB")
        if spec.mode != "fixed":
            return
        valid = valid_experts_per_rank(self.model.experts, self.workers)
        if spec.experts_per_rank not in valid:
            raise ConfigError("packing", f"{spec.experts_per_rank} experts per rank is not a layout of {self.model.experts} experts on {self.workers} workers",
                              f"use one of {', '.join(map(str, valid))} (experts per rank; the EP group size becomes experts / N)")
        if spec.at_step == 0 and self.ep_size and self.model.experts // spec.experts_per_rank != self.ep_size:
            raise ConfigError("packing", f"{spec.experts_per_rank} experts per rank from the start contradicts ep_size={self.ep_size}",
                              f"drop --ep-size, or use --packing {self.model.experts // self.ep_size}, or switch later with N@STEP")

    def emulate_spec(self):
        """The emulated cluster to run on (:class:`lina.cluster.emulate.EmulateSpec`), or None."""
        from lina.cluster.emulate import parse_emulate

        return parse_emulate(self.emulate)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = dict(data)
        model = _build(ModelConfig, data.pop("model", {}), "model.")
        return _build(cls, {**data, "model": model}, "")


def _build(cls, data: dict[str, Any], prefix: str):
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}{key}", "is not a known setting", f"remove it; known settings: {', '.join(sorted(known))}")
    out = {}
    for key, value in data.items():
        default = getattr(cls(), key) if key != "model" else None
        if default is not None and not isinstance(value, type(default)) and not (isinstance(default, float) and isinstance(value, int)):
            if not (isinstance(default, str) and isinstance(value, (int, float))):
                raise ConfigError(f"{prefix}{key}", f"{value!r} has type {type(value).__name__}, expected {type(default).__name__}", f"write {prefix}{key} as a {type(default).__name__}")
            value = str(value)
        out[key] = float(value) if isinstance(default, float) and isinstance(value, int) else value
    return cls(**out)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(name, f"{value!r} must be an integer >= 1", f"set {name} to 1 or more")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a dict (a ``[model]`` table holds model settings)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", f"file {str(p)!r} does not exist", "pass an existing .toml file to --config")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("config", f"{p} is not valid TOML ({err})", "fix the syntax of the file") from None


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Overlay ``overrides`` (may hold ``model.<name>`` keys or a ``model`` dict) on ``base``."""
    out = {**base, "model": dict(base.get("model", {}))}
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "model":
            out["model"].update(value)
        elif key.startswith("model."):
            out["model"][key[len("model."):]] = value
        else:
            out[key] = value
    return out

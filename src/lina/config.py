"""Typed configuration for models and training runs.

Configs are dataclasses, loadable from TOML and overridable from the command line, and validated
before any worker starts: every problem is a :class:`lina.errors.ConfigError` naming the field
and the fix, and all problems of a config are reported at once (:class:`lina.errors.ConfigErrors`).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lina.cluster.emulate import EmulateSpec, parse_emulate
from lina.devices import device_from
from lina.errors import ConfigError, ConfigErrors, raise_all
from lina.policy import TRAIN_POLICIES, canonical_policy_name, train_policy
from lina.policy.packing import parse_packing, valid_experts_per_rank

#: old name of a setting -> its name now (still accepted, with a note)
RENAMED = {"schedule": "policy"}


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

    def validate(self) -> None:
        """Raise :class:`ConfigError` (:class:`lina.errors.ConfigErrors` for several) for every problem."""
        raise_all(self.problems())

    def problems(self) -> list[ConfigError]:
        """Every problem of these settings (empty when they are valid)."""
        sizes = ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "d_ff", "experts", "moe_interval")
        checks = [lambda name=name: _positive_int(f"model.{name}", getattr(self, name)) for name in sizes]
        checks += [self._check_heads, self._check_top_k, self._check_capacity, self._check_noise, self._check_parts]
        checks += [lambda name=name: self._check_weight(name) for name in ("balance_loss_weight", "z_loss_weight")]
        return collect(checks)

    def _check_heads(self) -> None:
        if _is_positive_int(self.d_model) and _is_positive_int(self.n_heads) and self.d_model % self.n_heads:
            raise ConfigError(
                "model.d_model",
                f"{self.d_model} is not divisible by n_heads={self.n_heads}",
                "choose d_model as a multiple of n_heads",
            )

    def _check_top_k(self) -> None:
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError("model.top_k", f"{self.top_k!r} must be a positive integer", "use --top-k 1 or 2")
        if _is_positive_int(self.experts) and self.top_k > self.experts:
            raise ConfigError(
                "model.top_k",
                f"top-k {self.top_k} exceeds the number of experts {self.experts}",
                f"use --top-k <= {self.experts} or more --experts",
            )

    def _check_capacity(self) -> None:
        if not self.dropless and not self.capacity_factor > 0:
            raise ConfigError(
                "model.capacity_factor",
                f"{self.capacity_factor} must be > 0 when routing is not dropless",
                "set capacity_factor to e.g. 1.25, or dropless = true",
            )

    def _check_noise(self) -> None:
        if self.gate_noise < 0:
            raise ConfigError(
                "model.gate_noise",
                f"{self.gate_noise} is negative",
                "use 0 (off) or a small positive value such as 0.01",
            )

    def _check_weight(self, name: str) -> None:
        if getattr(self, name) < 0:
            raise ConfigError(f"model.{name}", "is negative", "use 0 to turn it off or a small positive weight")

    def _check_parts(self) -> None:
        if self.expert not in ("gelu", "swiglu"):
            raise ConfigError("model.expert", f"unknown expert FFN {self.expert!r}", "use gelu or swiglu")
        for name in ("shared_expert_d_ff", "first_k_dense"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(
                    f"model.{name}",
                    f"{getattr(self, name)!r} must be an integer >= 0",
                    "use 0 (off) or a positive integer",
                )
        if (
            _is_positive_int(self.n_layers)
            and _is_positive_int(self.moe_interval)
            and not any(self.is_moe(i) for i in range(self.n_layers))
        ):
            raise ConfigError(
                "model.first_k_dense",
                f"no MoE layer is left among {self.n_layers} layers",
                f"use first_k_dense < {self.n_layers} or a smaller moe_interval",
            )

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
    policy: str = "lina"  # a registered training policy (lina.policy), or module:NAME
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
    check_collectives: bool = False  # compare the ranks' per-group collective sequences after every step
    # Expert packing (see lina.train.packing): "off" (the layout of ep_size), "auto" (the controller
    # doubles experts per rank while FFN time per micro-op < all-to-all time per micro-op), "N" (N
    # experts per rank from the start) or "N@S" (N experts per rank from step S on).
    packing: str = "off"
    packing_first_step: int = 10  # auto: first decision before this step
    packing_every: int = 4  # auto: re-checked every this many steps
    max_expert_memory_mb: float = 0.0  # device memory for expert training state; 0 = unlimited
    # Compute (see lina.devicetime): "real" computes; a device name (a100, h100, ...) or a device
    # description file makes every compute op take that device's time, times the dilation, which
    # also divides the emulated links' rates. A device-time run routes by routing_trace.
    compute: str = "real"
    dilation: float = 1.0
    routing_trace: str = ""

    def __post_init__(self):
        self.policy = canonical_policy_name(self.policy)  # an old policy name, with a note

    @property
    def resolved_ep_size(self) -> int:
        return self.ep_size or self.workers

    @property
    def effective_packing(self) -> str:
        """The packing the run uses: ``packing`` when set, else ``auto`` for a policy that packs
        experts (``lina+packing``), else ``off``."""
        if self.packing != "off":
            return self.packing
        try:
            packs = train_policy(self.policy).packing
        except ConfigError:  # an unknown policy is reported by its own check
            packs = False
        return "auto" if packs else "off"

    def validate(self) -> None:
        """Raise :class:`ConfigError` (:class:`lina.errors.ConfigErrors` for several) for every problem."""
        raise_all(self.problems())

    def problems(self) -> list[ConfigError]:
        """Every problem of these settings, the model's included (empty when they are valid)."""
        checks = [
            lambda name=name: _positive_int(name, getattr(self, name))
            for name in (
                "workers",
                "steps",
                "batch_size",
                "pipeline_chunks",
                "credit",
                "eval_every",
                "eval_batches",
                "checkpoint_every",
                "log_every",
            )
        ]
        checks += [
            self._check_layout,
            self._check_policy,
            self._check_numbers,
            self._check_chunk_mb,
            self._check_corpus,
            self._validate_packing,
            self.validate_compute,
            self._check_emulate,
        ]
        return self.model.problems() + collect(checks)

    def _check_layout(self) -> None:
        if not isinstance(self.ep_size, int) or self.ep_size < 0:
            raise ConfigError(
                "ep_size",
                f"{self.ep_size!r} must be 0 (all workers) or a positive integer",
                "use 0 or a divisor of workers",
            )
        if not _is_positive_int(self.workers) or not _is_positive_int(self.model.experts):
            return  # reported on their own
        ep = self.resolved_ep_size
        if self.workers % ep:
            raise ConfigError(
                "ep_size",
                f"{ep} does not divide workers={self.workers}",
                "choose an EP size that divides the worker count",
            )
        if self.model.experts % ep:
            raise ConfigError(
                "experts",
                f"{self.model.experts} experts cannot be sharded evenly over an expert-parallel group of {ep} workers",
                f"use a multiple of {ep} experts (e.g. --experts {ep * max(1, self.model.experts // ep)}) or change --workers",
            )

    def _check_policy(self) -> None:
        trainable = ", ".join(n for n, p in TRAIN_POLICIES.items() if p.trainable and p.grad_sync != "none")
        try:
            spec = train_policy(self.policy)
        except ConfigError as err:
            hint = _did_you_mean(self.policy, TRAIN_POLICIES)
            raise ConfigError(err.field, err.problem + hint, err.fix) from None
        if not spec.trainable:
            raise ConfigError(
                "policy", f"{self.policy!r} exists in the simulator only", f"train with one of {trainable}"
            )
        if spec.grad_sync == "none":
            raise ConfigError(
                "policy",
                f"{self.policy!r} never synchronises gradients (timing only: a lower bound)",
                f"train with one of {trainable}; measure lower bounds with lina bench train",
            )

    def _check_numbers(self) -> None:
        problems = []
        if not self.lr > 0:
            problems.append(ConfigError("lr", f"{self.lr} must be > 0", "use e.g. 3e-3"))
        if self.bucket_mb <= 0:
            problems.append(ConfigError("bucket_mb", f"{self.bucket_mb} must be > 0", "use e.g. 25"))
        if self.corpus_max_mb <= 0:
            problems.append(ConfigError("corpus_max_mb", f"{self.corpus_max_mb} must be > 0", "use e.g. 3"))
        if self.timeout_s <= 0:
            problems.append(ConfigError("timeout_s", f"{self.timeout_s} must be > 0", "use e.g. 120"))
        raise_all(problems)

    def _check_chunk_mb(self) -> None:
        if self.chunk_mb != "auto":
            try:
                value = float(self.chunk_mb)
            except ValueError:
                value = -1.0
            if not value > 0:
                raise ConfigError(
                    "chunk_mb",
                    f"{self.chunk_mb!r} is neither 'auto' nor a positive number",
                    "use --chunk-mb auto or e.g. --chunk-mb 1",
                )

    def _check_corpus(self) -> None:
        if self.corpus and not Path(self.corpus).exists():
            raise ConfigError(
                "corpus",
                f"path {self.corpus!r} does not exist",
                "pass an existing text file or folder, or leave --corpus empty for the built-in Python-source corpus",
            )

    def _check_emulate(self) -> None:
        spec = self.emulate_spec()
        if spec is not None and spec.world_size != self.workers:
            raise ConfigError(
                "workers",
                f"{self.workers} workers but the emulated cluster has {spec.hosts} hosts x {spec.workers_per_host} workers",
                f"use --workers {spec.world_size} or change --emulate",
            )

    @property
    def device_time(self) -> bool:
        """Compute ops take a described device's time instead of being computed."""
        return self.compute != "real"

    def validate_compute(self) -> None:
        if not self.dilation > 0:
            raise ConfigError("dilation", f"{self.dilation} must be > 0", "use 1 (no dilation) or e.g. 100")
        if not self.device_time:
            if self.dilation != 1.0:
                raise ConfigError(
                    "dilation",
                    "time dilation needs a device-time compute mode",
                    "add --compute a100 (or another device), or drop --dilation",
                )
            return
        device_from(self.compute)
        if not self.routing_trace:
            raise ConfigError(
                "routing_trace",
                "a device-time run takes its routing from a recorded trace (its gate computes nothing)",
                "record one with lina infer --model DIR --record-trace FILE.npz, or pass the Mixtral trace "
                "(../shared/data/mixtral-8x7b-gsm8k-routing.jsonl) for 8 experts top-2",
            )
        if not Path(self.routing_trace).is_file():
            raise ConfigError(
                "routing_trace",
                f"file {self.routing_trace!r} does not exist",
                "pass an existing .npz or .jsonl routing trace",
            )

    def _validate_packing(self) -> None:
        spec = parse_packing(self.effective_packing)
        _positive_int("packing_first_step", self.packing_first_step)
        _positive_int("packing_every", self.packing_every)
        if self.max_expert_memory_mb < 0:
            raise ConfigError(
                "max_expert_memory_mb",
                f"{self.max_expert_memory_mb} is negative",
                "use 0 (unlimited) or a budget in MB",
            )
        if spec.mode != "fixed" or not _is_positive_int(self.workers) or not _is_positive_int(self.model.experts):
            return
        valid = valid_experts_per_rank(self.model.experts, self.workers)
        if spec.experts_per_rank not in valid:
            raise ConfigError(
                "packing",
                f"{spec.experts_per_rank} experts per rank is not a layout of {self.model.experts} experts on {self.workers} workers",
                f"use one of {', '.join(map(str, valid))} (experts per rank; the EP group size becomes experts / N)",
            )
        if spec.at_step == 0 and self.ep_size and self.model.experts // spec.experts_per_rank != self.ep_size:
            raise ConfigError(
                "packing",
                f"{spec.experts_per_rank} experts per rank from the start contradicts ep_size={self.ep_size}",
                f"drop --ep-size, or use --packing {self.model.experts // self.ep_size}, or switch later with N@STEP",
            )

    def emulate_spec(self) -> EmulateSpec | None:
        """The emulated cluster to run on, or None (links given in real-cluster units, divided by
        the dilation)."""
        return parse_emulate(self.emulate, self.dilation)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], problems: list[ConfigError] | None = None) -> "TrainConfig":
        """Build from a dict (a ``model`` dict holds the model's settings). Unknown keys (with a
        "did you mean" for a misspelt one) and values of the wrong type are all reported at once:
        raised, or appended to ``problems`` when given (the config is then built without them)."""
        found: list[ConfigError] = []
        data = renamed_settings(dict(data))
        model_data = data.pop("model", {})
        if not isinstance(model_data, dict):
            found.append(
                ConfigError("model", f"{model_data!r} is not a table", "write the model settings under [model]")
            )
            model_data = {}
        model = _build(ModelConfig, model_data, "model.", found)
        cfg = _build(cls, {**data, "model": model}, "", found)
        if problems is None:
            raise_all(found)
        else:
            problems.extend(found)
        return cfg


def renamed_settings(data: dict[str, Any]) -> dict[str, Any]:
    """Settings under an old name (:data:`RENAMED`) moved to the new one, with a note on stderr;
    both names at once is a config error."""
    for old, new in RENAMED.items():
        if old not in data:
            continue
        if new in data:
            raise ConfigError(old, f"both {old!r} and {new!r} are set", f"keep only {new} ({old} is its old name)")
        print(f"lina: note: the setting {old!r} is now called {new!r}; {old!r} is still accepted", file=sys.stderr)
        data[new] = data.pop(old)
    return data


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _build(cls, data: dict[str, Any], prefix: str, problems: list[ConfigError]):
    known = {f.name: f for f in fields(cls)}
    out = {}
    for key, value in data.items():
        if key not in known:
            hint = _did_you_mean(key, known)
            fix = f"remove it{' or correct its name' if hint else ''}; known settings: {', '.join(sorted(known))}"
            problems.append(ConfigError(f"{prefix}{key}", f"is not a known setting{hint}", fix))
            continue
        default = getattr(cls(), key) if key != "model" else None
        if (
            default is not None
            and not isinstance(value, type(default))
            and not (isinstance(default, float) and isinstance(value, int))
        ):
            if not (isinstance(default, str) and isinstance(value, (int, float))):
                want = type(default).__name__
                problems.append(
                    ConfigError(
                        f"{prefix}{key}",
                        f"{value!r} has type {type(value).__name__}, expected {want}",
                        f"write {prefix}{key} as a {want}",
                    )
                )
                continue
            value = str(value)
        out[key] = float(value) if isinstance(default, float) and isinstance(value, int) else value
    return cls(**out)


def collect(checks) -> list[ConfigError]:
    """Run every check (a callable that raises :class:`ConfigError`); return what they raised."""
    found: list[ConfigError] = []
    for check in checks:
        try:
            check()
        except ConfigErrors as err:
            found.extend(err.errors)
        except ConfigError as err:
            found.append(err)
    return found


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


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
            out["model"][key[len("model.") :]] = value
        else:
            out[key] = value
    return out

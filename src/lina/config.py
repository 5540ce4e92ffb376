"""Typed configuration for models and training runs.

Configs are dataclasses, loadable from TOML and overridable from the command line, and validated
before any worker starts: every problem is a :class:`lina.errors.ConfigError` naming the field
and the fix, and all problems of a config are reported at once (:class:`lina.errors.ConfigErrors`).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lina.devices import device_from
from lina.emulation_spec import EmulateSpec, parse_emulate
from lina.errors import ConfigError, ConfigErrors, raise_all
from lina.policy import TRAIN_POLICIES, canonical_policy_name, train_policy
from lina.policy.packing import parse_packing, valid_experts_per_rank

#: old name of a setting -> its name now (still accepted, with a note)
RENAMED = {"schedule": "policy"}


class Section(ABC):
    """A typed group of settings (a TOML table) that checks itself."""

    @abstractmethod
    def problems(self) -> list[ConfigError]:
        """Every problem of these settings (empty when they are valid)."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` (:class:`lina.errors.ConfigErrors` for several) for every problem."""
        raise_all(self.problems())


@dataclass
class ModelConfig(Section):
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
class CommConfig(Section):
    """Communication settings (TOML table ``[comm]``)."""

    bucket_mb: float = 25.0  # gradient bucket of the DDP-style syncs
    chunk_mb: str = "auto"  # lina partition size in MB, or "auto"
    pipeline_chunks: int = 2  # all-to-all micro-ops per MoE layer for tutel / lina
    credit: int = 1  # lina: allreduce micro-ops in flight at once
    timeout_s: float = 120.0  # collective timeout: a dead peer ends the job after at most this
    check_collectives: bool = False  # compare the ranks' per-group collective sequences after every step

    def problems(self) -> list[ConfigError]:
        """Every problem of these settings (empty when they are valid)."""
        checks = [
            lambda name=name: _positive_int(f"comm.{name}", getattr(self, name))
            for name in ("pipeline_chunks", "credit")
        ]
        checks += [
            lambda: _positive_number("comm.bucket_mb", self.bucket_mb, "25"),
            lambda: _positive_number("comm.timeout_s", self.timeout_s, "120"),
            self._check_chunk_mb,
        ]
        return collect(checks)

    def _check_chunk_mb(self) -> None:
        if self.chunk_mb != "auto":
            try:
                value = float(self.chunk_mb)
            except ValueError:
                value = -1.0
            if not value > 0:
                raise ConfigError(
                    "comm.chunk_mb",
                    f"{self.chunk_mb!r} is neither 'auto' nor a positive number",
                    "use --chunk-mb auto or e.g. --chunk-mb 1",
                )


@dataclass
class PackingConfig(Section):
    """Expert packing (TOML table ``[packing]``, see :mod:`lina.train.packing`).

    ``mode``: "off" (the layout of ep_size), "auto" (the controller doubles experts per rank while
    FFN time per micro-op < all-to-all time per micro-op), "N" (N experts per rank from the start)
    or "N@S" (N experts per rank from step S on).
    """

    mode: str = "off"
    first_step: int = 10  # auto: first decision before this step
    every: int = 4  # auto: re-checked every this many steps
    max_expert_memory_mb: float = 0.0  # device memory for expert training state; 0 = unlimited

    def problems(self) -> list[ConfigError]:
        """Every problem of these settings on their own (the layout checks need the whole run)."""
        return collect(
            [
                self._check_mode,
                lambda: _positive_int("packing.first_step", self.first_step),
                lambda: _positive_int("packing.every", self.every),
                self._check_memory,
            ]
        )

    def _check_mode(self) -> None:
        try:
            parse_packing(self.mode)
        except ConfigError as err:
            raise ConfigError("packing.mode", err.problem, err.fix) from None

    def _check_memory(self) -> None:
        if self.max_expert_memory_mb < 0:
            raise ConfigError(
                "packing.max_expert_memory_mb",
                f"{self.max_expert_memory_mb} is negative",
                "use 0 (unlimited) or a budget in MB",
            )


@dataclass
class EmulationConfig(Section):
    """Where and how the run's time passes (TOML table ``[emulation]``).

    ``emulate``: the emulated cluster (``hosts=4,link=200mbit``, see :mod:`lina.emulation_spec`) or
    "none" (loopback). ``compute`` (see :mod:`lina.devicetime`): "real" computes; a device name
    (a100, h100, ...) or a device description file makes every compute op take that device's time,
    times the ``dilation``, which also divides the emulated links' rates. A device-time run routes
    by ``routing_trace``.
    """

    emulate: str = "none"
    compute: str = "real"
    dilation: float = 1.0
    routing_trace: str = ""

    @property
    def device_time(self) -> bool:
        """Compute ops take a described device's time instead of being computed."""
        return self.compute != "real"

    def spec(self) -> EmulateSpec | None:
        """The emulated cluster to run on, or None (links given in real-cluster units, divided by
        the dilation)."""
        return parse_emulate(self.emulate, self.dilation)

    def problems(self) -> list[ConfigError]:
        """Every problem of these settings (empty when they are valid)."""
        return collect([self.validate_compute, self._check_spec])

    def _check_spec(self) -> None:
        if not (isinstance(self.dilation, (int, float)) and self.dilation > 0):
            return  # reported by validate_compute
        try:
            self.spec()
        except ConfigError as err:  # the grammar names its keys emulate.<key>
            raise ConfigError(f"emulation.{err.field}", err.problem, err.fix) from None

    def validate_compute(self) -> None:
        """Raise :class:`ConfigError` for a bad compute mode, dilation or routing trace."""
        if not self.dilation > 0:
            raise ConfigError("emulation.dilation", f"{self.dilation} must be > 0", "use 1 (no dilation) or e.g. 100")
        if not self.device_time:
            if self.dilation != 1.0:
                raise ConfigError(
                    "emulation.dilation",
                    "time dilation needs a device-time compute mode",
                    "add --compute a100 (or another device), or drop --dilation",
                )
            return
        device_from(self.compute)
        if not self.routing_trace:
            raise ConfigError(
                "emulation.routing_trace",
                "a device-time run takes its routing from a recorded trace (its gate computes nothing)",
                "record one with lina infer --model DIR --record-trace FILE.npz, or pass the Mixtral trace "
                "(../shared/data/mixtral-8x7b-gsm8k-routing.jsonl) for 8 experts top-2",
            )
        if not Path(self.routing_trace).is_file():
            raise ConfigError(
                "emulation.routing_trace",
                f"file {self.routing_trace!r} does not exist",
                "pass an existing .npz or .jsonl routing trace",
            )


@dataclass
class OutputConfig(Section):
    """What the run writes and where (TOML table ``[output]``)."""

    out: str = "runs/train"
    trace: str = ""  # folder for the timeline (Chrome trace, breakdown, plot); "" = off
    log_every: int = 10
    checkpoint_every: int = 50
    resume: bool = False  # continue from the latest checkpoint under out

    def problems(self) -> list[ConfigError]:
        """Every problem of these settings (empty when they are valid)."""
        return collect(
            [
                lambda name=name: _positive_int(f"output.{name}", getattr(self, name))
                for name in ("log_every", "checkpoint_every")
            ]
        )


#: the typed sections of a :class:`TrainConfig`: field (and TOML table) -> its dataclass
SECTIONS = {
    "model": ModelConfig,
    "comm": CommConfig,
    "packing": PackingConfig,
    "emulation": EmulationConfig,
    "output": OutputConfig,
}

#: flat settings of earlier versions -> their place in a section now (still accepted, with a note)
MOVED = {
    **{name: f"comm.{name}" for name in ("bucket_mb", "chunk_mb", "pipeline_chunks", "credit", "timeout_s")},
    "check_collectives": "comm.check_collectives",
    "packing": "packing.mode",
    "packing_first_step": "packing.first_step",
    "packing_every": "packing.every",
    "max_expert_memory_mb": "packing.max_expert_memory_mb",
    **{name: f"emulation.{name}" for name in ("emulate", "compute", "dilation", "routing_trace")},
    **{name: f"output.{name}" for name in ("out", "trace", "log_every", "checkpoint_every", "resume")},
}


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
    corpus: str = ""  # "" = the Python standard library's own source files
    corpus_max_mb: float = 3.0
    eval_every: int = 50
    eval_batches: int = 4
    comm: CommConfig = field(default_factory=CommConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    emulation: EmulationConfig = field(default_factory=EmulationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self):
        self.policy = canonical_policy_name(self.policy)  # an old policy name, with a note

    @property
    def resolved_ep_size(self) -> int:
        return self.ep_size or self.workers

    @property
    def effective_packing(self) -> str:
        """The packing the run uses: ``packing.mode`` when set, else ``auto`` for a policy that
        packs experts (``lina+packing``), else ``off``."""
        if self.packing.mode != "off":
            return self.packing.mode
        try:
            packs = train_policy(self.policy).packing
        except ConfigError:  # an unknown policy is reported by its own check
            packs = False
        return "auto" if packs else "off"

    def validate(self) -> None:
        """Raise :class:`ConfigError` (:class:`lina.errors.ConfigErrors` for several) for every problem."""
        raise_all(self.problems())

    def problems(self) -> list[ConfigError]:
        """Every problem of these settings, every section's included (empty when they are valid)."""
        checks = [
            lambda name=name: _positive_int(name, getattr(self, name))
            for name in ("workers", "steps", "batch_size", "eval_every", "eval_batches")
        ]
        checks += [
            self._check_layout,
            self._check_policy,
            self._check_numbers,
            self._check_corpus,
            self._check_packing_layout,
            self._check_emulated_workers,
        ]
        sections = [getattr(self, name).problems() for name in SECTIONS]
        return [problem for found in sections for problem in found] + collect(checks)

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
                f"use a multiple of {ep} experts (e.g. --experts "
                f"{ep * max(1, self.model.experts // ep)}) or change --workers",
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
        if self.corpus_max_mb <= 0:
            problems.append(ConfigError("corpus_max_mb", f"{self.corpus_max_mb} must be > 0", "use e.g. 3"))
        raise_all(problems)

    def _check_corpus(self) -> None:
        if self.corpus and not Path(self.corpus).exists():
            raise ConfigError(
                "corpus",
                f"path {self.corpus!r} does not exist",
                "pass an existing text file or folder, or leave --corpus empty for the built-in Python-source corpus",
            )

    def _check_emulated_workers(self) -> None:
        try:
            spec = self.emulation.spec()
        except ConfigError:  # reported by the emulation section's own check
            return
        if spec is not None and spec.world_size != self.workers:
            raise ConfigError(
                "workers",
                f"{self.workers} workers but the emulated cluster has {spec.hosts} hosts x "
                f"{spec.workers_per_host} workers",
                f"use --workers {spec.world_size} or change --emulate",
            )

    def _check_packing_layout(self) -> None:
        """The packing against the run's layout (the policy may turn packing on)."""
        try:
            spec = parse_packing(self.effective_packing)
        except ConfigError:  # a bad packing.mode is reported by the section
            return
        if spec.mode != "fixed" or not _is_positive_int(self.workers) or not _is_positive_int(self.model.experts):
            return
        valid = valid_experts_per_rank(self.model.experts, self.workers)
        if spec.experts_per_rank not in valid:
            raise ConfigError(
                "packing.mode",
                f"{spec.experts_per_rank} experts per rank is not a layout of {self.model.experts} experts on "
                f"{self.workers} workers",
                f"use one of {', '.join(map(str, valid))} (experts per rank; the EP group size becomes experts / N)",
            )
        if spec.at_step == 0 and self.ep_size and self.model.experts // spec.experts_per_rank != self.ep_size:
            raise ConfigError(
                "packing.mode",
                f"{spec.experts_per_rank} experts per rank from the start contradicts ep_size={self.ep_size}",
                f"drop --ep-size, or use --packing {self.model.experts // self.ep_size}, or switch later with N@STEP",
            )

    def emulate_spec(self) -> EmulateSpec | None:
        """The emulated cluster to run on (:meth:`EmulationConfig.spec`), or None."""
        return self.emulation.spec()

    def to_dict(self) -> dict[str, Any]:
        """Nested: each section a dict under its name (what :meth:`from_dict` and TOML read)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], problems: list[ConfigError] | None = None) -> "TrainConfig":
        """Build from a dict (each section's settings in a dict under its name: ``model``, ``comm``,
        ``packing``, ``emulation``, ``output``; flat keys of earlier versions are moved there with a
        note). Unknown keys (with a "did you mean" for a misspelt one) and values of the wrong type
        are all reported at once: raised, or appended to ``problems`` when given (the config is then
        built without them)."""
        found: list[ConfigError] = []
        data = moved_settings(renamed_settings(dict(data)))
        sections = {}
        for name, section_cls in SECTIONS.items():
            section_data = data.pop(name, {})
            if not isinstance(section_data, dict):
                found.append(
                    ConfigError(name, f"{section_data!r} is not a table", f"write the {name} settings under [{name}]")
                )
                section_data = {}
            sections[name] = _build(section_cls, section_data, f"{name}.", found)
        cfg = _build(cls, {**data, **sections}, "", found)
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


def moved_settings(data: dict[str, Any]) -> dict[str, Any]:
    """Flat settings of earlier versions (:data:`MOVED`) moved into their section, with a note on
    stderr naming the new place; a setting given in both places is a config error. ``packing``
    is the old flat setting when it is not a table."""
    data = {
        name: dict(value) if name in SECTIONS and isinstance(value, dict) else value for name, value in data.items()
    }
    for old, new in MOVED.items():
        if old not in data or (old in SECTIONS and isinstance(data[old], dict)):
            continue
        section, key = new.split(".")
        value = data.pop(old)
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            continue  # reported as "not a table" by from_dict
        if key in table:
            raise ConfigError(old, f"both {old!r} and {new!r} are set", f"keep only {key} under [{section}]")
        print(
            f"lina: note: the setting {old!r} is now {new!r} (write {key} under [{section}]); "
            f"{old!r} is still accepted",
            file=sys.stderr,
        )
        table[key] = value
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
        default = getattr(cls(), key) if key not in SECTIONS else None
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


def _positive_number(name: str, value: Any, example: str) -> None:
    if not value > 0:
        raise ConfigError(name, f"{value} must be > 0", f"use e.g. {example}")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a dict (tables ``[model]``, ``[comm]``, ``[packing]``, ``[emulation]``,
    ``[output]`` hold their sections' settings)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", f"file {str(p)!r} does not exist", "pass an existing .toml file to --config")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("config", f"{p} is not valid TOML ({err})", "fix the syntax of the file") from None


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Overlay ``overrides`` on ``base`` (its flat settings of earlier versions first moved into
    their sections, :func:`moved_settings`). An override is ``<setting>``, ``<section>.<setting>``
    (``comm.credit``) or a whole section's dict; None means "not given"."""
    out = moved_settings(dict(base))
    for key, value in overrides.items():
        if value is None:
            continue
        section, dot, name = key.partition(".")
        if key in SECTIONS and isinstance(value, dict):
            out[key] = {**_table(out, key), **value}
        elif dot and section in SECTIONS:
            out[section] = {**_table(out, section), name: value}
        else:
            out[key] = value
    return out


def _table(data: dict[str, Any], section: str) -> dict[str, Any]:
    value = data.get(section, {})
    return value if isinstance(value, dict) else {}

"""What a benchmark hands its workers: a frozen dataclass written as a readable JSON plan file.

A benchmark command builds a plan (a :class:`BenchPlan` subclass), writes it with
:meth:`BenchPlan.save` next to its results and starts its workers on the file; each worker reads it
back with :meth:`BenchPlan.load`, which checks it before any process group forms. Not JSON, not an
object, another benchmark's plan, a missing or unknown field, or a value of the wrong type is a
:class:`lina.errors.LinaError` naming the file, the field and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

from lina.errors import LinaError


@dataclasses.dataclass(frozen=True)
class BenchPlan:
    """Base of the benchmarks' plans; a subclass is a frozen dataclass of JSON-typed fields
    (``int``, ``float``, ``str``, ``bool``, ``tuple[X, ...]``, ``dict``, ``X | None``)."""

    #: the benchmark this plan belongs to, written as ``"plan"`` in the file
    KIND: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.KIND, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        """Indented JSON, one field a line (tuples as lists)."""
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_json(cls, text: str, where: str = "plan"):
        """The plan in ``text``; :class:`LinaError` naming ``where`` and the field for a bad one."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise LinaError(f"{where} is not JSON ({err}). Fix: write it again with lina bench") from None
        if not isinstance(data, dict):
            raise LinaError(f"{where} holds {type(data).__name__}, not a plan object. Fix: pass a plan file")
        kind = data.pop("plan", None)
        if kind != cls.KIND:
            raise LinaError(
                f"{where} is a plan of {kind!r}, not of {cls.KIND!r}. Fix: pass the plan lina bench {cls.KIND} wrote"
            )
        return cls.from_dict(data, where)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "plan"):
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise LinaError(
                f"{where}: unknown field {', '.join(map(repr, unknown))}. Fix: remove it (fields: {', '.join(fields)})"
            )
        values = {}
        for name, f in fields.items():
            if name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise LinaError(f"{where}: field {name!r} is missing. Fix: add it, or write the plan again")
                continue
            try:
                values[name] = _typed(data[name], hints[name])
            except TypeError:
                raise LinaError(
                    f"{where}: field {name!r} is {data[name]!r}, not {_describe(hints[name])}. Fix: correct it"
                ) from None
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path):
        """The plan in file ``path`` (see :meth:`from_json`)."""
        path = Path(path)
        if not path.is_file():
            raise LinaError(f"plan file {str(path)!r} does not exist. Fix: pass the file lina bench wrote")
        return cls.from_json(path.read_text(), str(path))


def _typed(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (a list becomes a tuple, an int a float); TypeError when it is not."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _typed(value, arm)
            except TypeError:
                continue
        raise TypeError(hint)
    if hint is type(None):
        if value is None:
            return None
        raise TypeError(hint)
    if hint is bool or hint is str:
        if isinstance(value, hint):
            return value
        raise TypeError(hint)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(hint)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(hint)
        return tuple(_typed(item, args[0]) for item in value)
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise TypeError(hint)
    raise TypeError(hint)  # pragma: no cover - a plan field of a type this module does not know


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def _describe(hint: Any) -> str:
    """``int | None`` -> "an integer or null", ``tuple[str, ...]`` -> "a list, each a string"."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in typing.get_args(hint))
    if origin is tuple:
        return f"a list, each {_describe(typing.get_args(hint)[0])}"
    if hint is dict or origin is dict:
        return "an object"
    return _NAMES.get(hint, str(hint))


@dataclasses.dataclass(frozen=True)
class TrainBenchPlan(BenchPlan):
    """One layout of ``lina bench train`` (:mod:`lina.bench.train` -> :mod:`lina.bench.train_worker`).

    The workers train ``model`` (a :class:`lina.config.ModelConfig` dict) with each count of
    ``experts`` in turn, interleaving ``policies`` (and the DeepSpeed ``peers``) for ``rounds`` x
    ``steps_per_round`` measured steps after ``warmup``; ``buckets`` > 0 sizes the DDP buckets to
    that many per step (0: 25 MB buckets). Results go to ``out``/results-``layout``.json.
    """

    KIND: ClassVar[str] = "train"

    layout: str
    hosts: int
    workers_per_host: int
    link_bps: int  # the real cluster's link (the emulated one runs at link_bps / dilation)
    experts: tuple[int, ...]
    policies: tuple[str, ...]
    model: dict
    batch_size: int
    chunk_mb: str
    buckets: int
    pipeline_chunks: int
    seed: int
    warmup: int
    rounds: int
    steps_per_round: int
    out: str
    packing_window: int
    credit: int = 1
    settle: int = 0
    intra_bps: int = 0  # the real cluster's intra-host link (0: free loopback), emulated at intra_bps / dilation
    compute: str = "real"
    dilation: float = 1.0
    routing_trace: str = ""
    peers: tuple[str, ...] = ()
    timeout_s: float = 300.0

    @property
    def world(self) -> int:
        return self.hosts * self.workers_per_host


@dataclasses.dataclass(frozen=True)
class InferBenchPlan(BenchPlan):
    """One routing trace of ``lina bench infer`` (:mod:`lina.bench.infer` -> :mod:`lina.bench.infer_worker`):
    serve ``batches`` batches of ``tokens_per_rank`` tokens per rank (after ``warmup``) from the held-out
    ``trace`` with each serving policy, experts of width ``d_model`` x ``d_ff`` on ``layers`` layers."""

    KIND: ClassVar[str] = "infer"

    trace: str
    estimator: str
    layers: int
    d_model: int
    d_ff: int
    tokens_per_rank: int
    batches: int
    warmup: int
    policies: tuple[str, ...]
    eplb_replan_every: int
    seed: int
    result: str
    world: int
    compute: str = "real"  # or a device: the expert FFNs take its time x dilation (lina.devicetime)
    dilation: float = 1.0


@dataclasses.dataclass(frozen=True)
class ContentionPlan(BenchPlan):
    """``lina bench contention`` (:mod:`lina.bench.contention` -> :mod:`lina.bench.contention_worker`):
    ``pairs`` measured pairs (after ``warmup``) of an all-to-all of ``a2a_elems`` float32 per rank,
    alone and beside an allreduce of ``allreduce_elems`` float32; rank 0 writes the per-rank
    durations to ``out`` and every rank its timeline under ``timeline_dir``."""

    KIND: ClassVar[str] = "contention"

    pairs: int
    a2a_elems: int
    allreduce_elems: int
    out: str
    timeline_dir: str
    warmup: int = 2

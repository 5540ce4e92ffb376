"""Reading run folders: ``summary.json`` and ``timeline-rank{R}.jsonl`` into :class:`RunRecord`.

A run folder of the current schema (:mod:`lina.obs.schema`) says what ran in its summary's
``setup`` (:class:`~lina.obs.schema.RunSetup`). A folder of version 1 has only a ``config``, in
either of two forms, read by :func:`setup_from_v1`:

- flat: ``layers, d_model, d_ff, experts, top_k, seq_len, batch_size, workers, hosts,
  workers_per_host, link_bps, policy, chunk_mb`` (optional: ``bucket_mb``, ``pipeline_chunks``,
  ``ep_size``, ``vocab``, ``capacity_factor``);
- the trainer's ``TrainConfig.to_dict()``: ``model.{n_layers, d_model, d_ff, experts, top_k,
  seq_len, vocab_size}``, ``workers, batch_size, schedule, chunk_mb, bucket_mb, pipeline_chunks``
  and ``emulate`` (``"hosts=4,link=200mbit,workers_per_host=1"``); the expert-parallel group in
  effect is read from ``summary["packing"]["ep_size"]`` when present.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from lina.errors import ConfigError, LinaError
from lina.obs import schema
from lina.obs.schema import RunSetup
from lina.obs.timeline import Span, load_rank_timelines
from lina.policy import POLICY_ALIASES
from lina.sim.a2a_skew import a2a_skew
from lina.sim.calibration.host import GLOO_THREADS, core_share
from lina.sim.calibration.layout import ep_of, group_ranks_per_host
from lina.sim.spec import ModelSpec, TrainSpec


@dataclass
class RunRecord:
    """One measured run: its shape, policy, measured median step and spans by rank."""

    path: Path
    hosts: int
    workers_per_host: int
    link_bps: float
    model: ModelSpec
    policy: str
    ep_size: int | None
    train: TrainSpec
    measured_step_s: float
    spans: dict[int, list[Span]] = field(repr=False, default_factory=dict)
    cpu_count: int | None = None  # cores of the machine the run shared (None: this machine's)
    a2a_in_flight: int = GLOO_THREADS  # all-to-all operations a rank's backend runs at once
    device: str | None = None  # device-time compute (``--compute DEVICE``): that device; None: real compute
    dilation: float = 1.0  # time dilation K of a device-time run (its times are the real cluster's x K)

    @property
    def device_mode(self) -> bool:
        """The run computed in device time: its compute is the device model, not this machine's CPU."""
        return self.device is not None

    @property
    def a2a_skew(self) -> float:
        """The busiest rank's (or host's) all-to-all bytes over the mean rank's, read from the spans."""
        return self.train.a2a_skew

    @property
    def core_share(self) -> float:
        """Cores per rank, at most 1: the ranks of an emulated cluster share one machine's cores."""
        return core_share(self.cpu_count, self.workers)

    @property
    def workers(self) -> int:
        return self.hosts * self.workers_per_host

    @property
    def label(self) -> str:
        m = self.model
        return (
            f"{self.path.name}: {self.hosts}x{self.workers_per_host} @{self.link_bps / 1e6:g}Mb/s "
            f"{m.layers}L d{m.d_model} E{m.experts} T{m.tokens}"
        )


# --------------------------------------------------------------------------- version 1 summaries
def _get(cfg: dict, *names, default=None):
    for name in names:
        if name in cfg and cfg[name] is not None:
            return cfg[name]
    return default


def setup_from_v1(summary: dict, path: Path) -> RunSetup:
    """The :class:`~lina.obs.schema.RunSetup` of a version-1 ``summary.json`` (see the module
    docstring): its config's fields under the names either form gave them."""
    cfg = summary.get("config")
    if not isinstance(cfg, dict):
        raise LinaError(f"{path}/summary.json has no 'config' object")
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else cfg
    for section in ("comm", "emulation"):  # a config in sections (TrainConfig.to_dict)
        if isinstance(cfg.get(section), dict):
            cfg = {**cfg, **cfg[section]}
    out = {
        "layers": _get(model, "layers", "n_layers"),
        "d_model": _get(model, "d_model"),
        "d_ff": _get(model, "d_ff"),
        "experts": _get(model, "experts"),
        "top_k": _get(model, "top_k"),
        "seq_len": _get(model, "seq_len"),
        "vocab": _get(model, "vocab", "vocab_size", default=256),
        "moe_every": _get(model, "moe_every", "moe_interval", default=1),
        "batch_size": _get(cfg, "batch_size"),
        "workers": _get(cfg, "workers"),
        "policy": _get(cfg, "policy", "schedule"),
        "chunk_mb": _get(cfg, "chunk_mb", default=30.0),
        "bucket_mb": _get(cfg, "bucket_mb", default=25.0),
        "coalesce_small": bool(_get(cfg, "coalesce_small", default=True)),
        "pipeline_chunks": _get(cfg, "pipeline_chunks", "tutel_chunks", default=2),
        "ep_size": _get(cfg, "ep_size", default=None) or None,
        "experts_per_rank": _get(cfg, "experts_per_rank", default=None),
        "hosts": _get(cfg, "hosts"),
        "workers_per_host": _get(cfg, "workers_per_host"),
        "link_bps": _get(cfg, "link_bps", "link_rate_bps", "link_bit_s"),
        "cpu_count": _get(cfg, "cpu_count", default=None),
        "a2a_in_flight": _get(cfg, "a2a_in_flight", default=None),
        "backend": _get(cfg, "backend", default=summary.get("backend", "gloo")),
    }
    emulate = cfg.get("emulate")
    if isinstance(emulate, str) and out["hosts"] is None:
        from lina.emulation_spec import parse_emulate

        spec = parse_emulate(emulate)
        if spec is None:
            raise LinaError(f"{path}: ran on plain loopback (emulate={emulate!r}); there is no link to calibrate")
        out.update(hosts=spec.hosts, workers_per_host=spec.workers_per_host, link_bps=spec.link_bps)
    packing = summary.get("packing")
    if isinstance(packing, dict) and packing.get("ep_size"):
        out["ep_size"] = packing["ep_size"]
    elif out["experts_per_rank"]:
        out["ep_size"] = int(out["experts"]) // int(out["experts_per_rank"])
    del out["experts_per_rank"]
    missing = [k for k, v in out.items() if v is None and k not in ("ep_size", "cpu_count", "a2a_in_flight")]
    if missing:
        raise LinaError(f"{path}/summary.json: config lacks {', '.join(missing)}")
    chunk = summary.get("chunk_mb_resolved", out["chunk_mb"])  # what "auto" chose, when the run says
    try:
        out["chunk_mb"] = float(chunk)
    except (TypeError, ValueError):
        raise LinaError(
            f"{path}/summary.json: chunk_mb is {out['chunk_mb']!r} and the run does not say what it chose "
            "(no chunk_mb_resolved): re-run with a fixed --chunk-mb, or with this version of lina train"
        ) from None
    ints = (
        "layers",
        "d_model",
        "d_ff",
        "experts",
        "top_k",
        "seq_len",
        "vocab",
        "moe_every",
        "batch_size",
        "workers",
        "pipeline_chunks",
        "hosts",
        "workers_per_host",
        "ep_size",
        "cpu_count",
        "a2a_in_flight",
    )
    out.update({k: int(out[k]) for k in ints if out[k]})
    out["link_bps"], out["bucket_mb"], out["policy"] = (
        float(out["link_bps"]),
        float(out["bucket_mb"]),
        POLICY_ALIASES.get(str(out["policy"]), str(out["policy"])),  # a run recorded under an old name
    )
    return RunSetup(**out)


# --------------------------------------------------------------------------- reading a folder
def read_setup(path: Path) -> tuple[RunSetup, float]:
    """(what ran, measured median step time) of the run folder ``path``, of either schema version."""
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError) as err:
        raise LinaError(f"cannot read {path}/summary.json: {err}") from err
    where = f"{path}/summary.json"
    if schema.summary_version(summary, where) >= 2:
        if not isinstance(summary.get("setup"), dict):
            raise LinaError(f"{where}: schema version {summary['schema_version']} without a 'setup' object")
        setup = RunSetup.from_dict(summary["setup"], where)
    else:
        setup = setup_from_v1(summary, path)
    measured = summary.get("step_time_s_median")
    if not isinstance(measured, (int, float)) or measured <= 0:
        raise LinaError(f"{where}: step_time_s_median is missing or not positive")
    if setup.link_bps is None or setup.hosts is None or setup.workers_per_host is None:
        raise LinaError(
            f"{path}: ran on plain loopback (no emulated hosts and link recorded); there is no link to calibrate"
        )
    return setup, float(measured)


def read_run(path: str | Path) -> RunRecord:
    """Read one run folder (see the module docstring)."""
    path = Path(path)
    setup, measured = read_setup(path)
    model = ModelSpec(
        name=path.name,
        layers=setup.layers,
        d_model=setup.d_model,
        d_ff=setup.d_ff,
        experts=setup.experts,
        top_k=setup.top_k,
        seq_len=setup.seq_len,
        batch_size=setup.batch_size,
        vocab=setup.vocab,
        moe_every=setup.moe_every,
        act_bytes=4,
        grad_bytes=4,
        param_bytes=4,
    )
    chunks = setup.pipeline_chunks
    spans = load_rank_timelines(path)
    if not spans:
        raise LinaError(f"{path}: no timeline-rank*.jsonl files")
    counts = any(s.cat == "a2a" and s.kind == schema.COUNTS for s in spans[min(spans)])
    train = TrainSpec(
        chunk_mb=setup.chunk_mb,
        bucket_mb=setup.bucket_mb,
        tutel_chunks=chunks,
        lina_a2a_chunks=chunks,
        count_exchange=counts,
        coalesce_small=setup.coalesce_small,
    )
    hosts, wph = setup.hosts, setup.workers_per_host
    if hosts * wph != setup.workers:
        raise LinaError(f"{path}: {hosts} hosts x {wph} workers != {setup.workers} workers")
    in_flight = setup.a2a_in_flight or (
        1 if setup.backend == "nccl" else GLOO_THREADS
    )  # NCCL: one stream; Gloo: its threads
    run = RunRecord(
        path,
        hosts,
        wph,
        float(setup.link_bps),
        model,
        setup.policy,
        setup.ep_size or None,
        train,
        measured,
        spans,
        setup.cpu_count or None,
        in_flight,
    )
    run.device, run.dilation = device_time_of(path)
    # the busiest host's bytes when the group's all-to-alls share host links, else the busiest rank's
    g = group_ranks_per_host(run)
    skew = a2a_skew(spans, g if ep_of(run) > g else 1)
    return replace(run, train=replace(train, a2a_skew=skew))


def device_time_of(path: Path) -> tuple[str | None, float]:
    """(device, dilation) of a device-time run (its summary's ``device_time``), else (None, 1.0)."""
    summary = json.loads((path / "summary.json").read_text())
    dt = summary.get("device_time")
    if not isinstance(dt, dict):
        return None, 1.0
    return str(dt.get("device", "device")), float(dt.get("dilation", 1.0))


def find_runs(root: str | Path) -> list[RunRecord]:
    """Every run folder at or below ``root`` (a folder holding ``summary.json``)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError("--calibrate", f"{root} is not a directory", "give the folder of emulated-cluster runs")
    dirs = sorted({p.parent for p in root.rglob("summary.json")})
    if not dirs:
        raise LinaError(f"no summary.json under {root}: nothing to calibrate against")
    return [read_run(d) for d in dirs]

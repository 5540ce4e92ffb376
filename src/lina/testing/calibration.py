"""Run folders written by the simulator itself (known parameters), so that tests can check that
the calibration (:mod:`lina.sim.calibration`) recovers them."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np

from lina.errors import ConfigError, LinaError
from lina.obs.schema import COMBINE, RunSetup, fields_of, run_summary
from lina.obs.timeline import Timeline
from lina.sim.compute import ComputeProfile
from lina.sim.spec import ClusterSpec, ModelSpec, TrainSpec
from lina.sim.train import TrainResult, simulate_step


def write_synthetic_run(
    path: str | Path,
    cluster: ClusterSpec,
    model: ModelSpec,
    profile: ComputeProfile,
    train: TrainSpec,
    policy: str,
    steps: int = 4,
    jitter: float = 0.0,
    seed: int = 0,
    cpu_count: int | None = None,
) -> TrainResult:
    """Simulate ``policy`` and write a run folder in the current schema (:mod:`lina.obs.schema`).

    Every rank gets the same spans (training is symmetric); ``jitter`` scales each step's spans
    by a random factor in ``[1 - jitter, 1 + jitter]`` so the data are not all alike.
    ``cpu_count``: the cores the run says its ranks shared (default: one per rank); ``profile``
    holds the costs as they were on those cores. With ``train.a2a_skew`` above 1, rank 0 is the
    busiest receiver: its combine spans record ``a2a_skew`` times the mean rank's bytes and the
    other ranks' the rest (so :func:`lina.sim.a2a_skew.a2a_skew` reads it back by rank).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n = cluster.gpus
    if train.a2a_skew > n:
        raise ConfigError("a2a_skew", f"{train.a2a_skew} is more than the {n} ranks can receive", f"use at most {n}")
    result = simulate_step(cluster, model, profile, train, policy)
    others = (n - train.a2a_skew) / (n - 1) if n > 1 else 1.0

    def recorded(rank: int, span) -> dict:
        fields = {**fields_of(span), **span.args}
        if train.a2a_skew == 1.0 or span.kind != COMBINE:
            return fields
        return {**fields, "bytes": span.bytes * (train.a2a_skew if rank == 0 else others)}

    rng = np.random.default_rng(seed)
    timelines = [Timeline(rank) for rank in range(cluster.gpus)]
    offset = 0.0
    step_times = []
    for step in range(steps):
        scale = 1.0 + jitter * (2 * rng.random() - 1)
        for rank, tl in enumerate(timelines):
            for s in result.timeline(rank, 0.0, step).spans():
                tl.record(
                    s.name,
                    s.cat,
                    offset + s.start_s * scale,
                    offset + s.end_s * scale,
                    thread=s.thread,
                    **recorded(rank, s),
                )
        step_times.append(result.step_s * scale)
        offset += result.step_s * scale + 1e-3
    for tl in timelines:
        tl.save_jsonl(path / f"timeline-rank{tl.rank}.jsonl")
    setup = RunSetup(
        layers=model.layers,
        d_model=model.d_model,
        d_ff=model.d_ff,
        experts=model.experts,
        top_k=model.top_k,
        seq_len=model.seq_len,
        batch_size=model.batch_size,
        vocab=model.vocab,
        workers=cluster.gpus,
        hosts=cluster.hosts,
        workers_per_host=cluster.gpus_per_host,
        link_bps=cluster.link_gbps * 1e9,
        policy=policy,
        chunk_mb=train.chunk_mb,
        bucket_mb=train.bucket_mb,
        pipeline_chunks=train.lina_a2a_chunks or train.tutel_chunks,
        coalesce_small=train.coalesce_small,
        cpu_count=cpu_count or cluster.gpus,  # the simulator's devices do not share cores unless told
        a2a_in_flight=cluster.a2a_in_flight,
    )
    config = {
        "layers": model.layers,
        "d_model": model.d_model,
        "d_ff": model.d_ff,
        "experts": model.experts,
        "top_k": model.top_k,
        "seq_len": model.seq_len,
        "batch_size": model.batch_size,
        "vocab": model.vocab,
        "workers": cluster.gpus,
        "hosts": cluster.hosts,
        "workers_per_host": cluster.gpus_per_host,
        "link_bps": cluster.link_gbps * 1e9,
        "policy": policy,
        "chunk_mb": train.chunk_mb,
        "bucket_mb": train.bucket_mb,
        "pipeline_chunks": train.lina_a2a_chunks or train.tutel_chunks,
        "coalesce_small": train.coalesce_small,
        "cpu_count": cpu_count or cluster.gpus,  # the simulator's devices do not share cores unless told
        "a2a_in_flight": cluster.a2a_in_flight,
    }
    summary = run_summary(
        setup,
        config,
        statistics.median(step_times[1:] if steps >= 3 else step_times),
        source="lina.testing.calibration.write_synthetic_run",
    )
    (path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not math.isfinite(summary["step_time_s_median"]):
        raise LinaError("synthetic run produced a non-finite step time")
    return result

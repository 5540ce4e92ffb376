"""The run schema: typed span fields written and read back, version-1 files still read (trainer
and simulator naming), newer versions refused with a clear message, and a run folder read the
same whichever version wrote it."""

from __future__ import annotations

import json
import shutil

import pytest

from lina.errors import LinaError
from lina.obs import schema
from lina.obs.report import breakdown_table
from lina.obs.timeline import Span, Timeline, load_jsonl, load_rank_timelines
from lina.sim.a2a_skew import a2a_skew
from lina.sim.compute import ComputeProfile
from lina.sim.spec import ClusterSpec, ModelSpec, TrainSpec
from lina.train.packing import forward_micro_ops


def test_typed_fields_round_trip_with_the_version(tmp_path):
    tl = Timeline(rank=1)
    tl.record(
        "any label", "a2a", 0.0, 1.0, kind=schema.DISPATCH, layer=3, phase="fwd", micro_op=1, bytes=4096, peer=2, step=7
    )
    tl.record("step", "step", 0.0, 2.0, kind=schema.STEP, step=7)
    path = tmp_path / "timeline-rank1.jsonl"
    tl.save_jsonl(path)
    line = json.loads(path.read_text().splitlines()[0])
    assert line["v"] == schema.SCHEMA_VERSION and line["kind"] == "dispatch" and line["args"] == {"step": 7}
    span = load_jsonl(path)[0]
    assert (span.kind, span.layer, span.phase, span.micro_op, span.bytes, span.peer) == (
        "dispatch",
        3,
        "fwd",
        1,
        4096,
        2,
    )
    assert span.name == "any label" and span.rank == 1


V1_TRAINER = [
    {
        "name": "counts",
        "cat": "a2a",
        "start_s": 0.0,
        "end_s": 0.1,
        "rank": 0,
        "thread": "main",
        "args": {"phase": "fwd", "bytes": 16},
    },
    {
        "name": "moe2.dispatch",
        "cat": "a2a",
        "start_s": 0.1,
        "end_s": 0.2,
        "rank": 0,
        "thread": "main",
        "args": {"phase": "fwd", "bytes": 2048, "micro_op": 1},
    },
    {
        "name": "moe2.experts",
        "cat": "compute",
        "start_s": 0.2,
        "end_s": 0.3,
        "rank": 0,
        "thread": "main",
        "args": {"micro_op": 1},
    },
    {
        "name": "moe2.experts.bwd",
        "cat": "compute",
        "start_s": 0.3,
        "end_s": 0.4,
        "rank": 0,
        "thread": "main",
        "args": {"micro_op": 0},
    },
    {
        "name": "gradsync.finish",
        "cat": "sched",
        "start_s": 0.4,
        "end_s": 0.5,
        "rank": 0,
        "thread": "main",
        "args": {"step": 0},
    },
    {
        "name": "bucket0",
        "cat": "allreduce",
        "start_s": 0.4,
        "end_s": 0.5,
        "rank": 0,
        "thread": "allreduce",
        "args": {"bytes": 80},
    },
]
V1_SIMULATOR = [
    {
        "name": "bwd.combine.L1.c0",
        "cat": "a2a",
        "start_s": 0.0,
        "end_s": 0.1,
        "rank": 0,
        "thread": "a2a",
        "args": {"layer": 1, "phase": "combine", "direction": "bwd", "bytes": 512.0, "chunk": 0},
    },
    {
        "name": "fwd.expert.L1.c1",
        "cat": "compute",
        "start_s": 0.1,
        "end_s": 0.2,
        "rank": 0,
        "thread": "compute",
        "args": {"layer": 1, "kind": "expert", "direction": "fwd", "chunk": 1},
    },
    {
        "name": "fwd.counts.L0",
        "cat": "a2a",
        "start_s": 0.2,
        "end_s": 0.3,
        "rank": 0,
        "thread": "a2a",
        "args": {"layer": 0, "phase": "counts", "direction": "fwd", "bytes": 32.0},
    },
]


def test_version_one_lines_get_their_fields_from_names_and_args(tmp_path):
    path = tmp_path / "timeline-rank0.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in V1_TRAINER + V1_SIMULATOR))
    got = [(s.kind, s.layer, s.phase, s.micro_op, s.bytes, s.args) for s in load_jsonl(path)]
    assert got == [
        ("counts", None, "fwd", None, 16, {}),
        ("dispatch", 2, "fwd", 1, 2048, {}),
        ("expert", 2, "fwd", 1, None, {}),
        ("expert", 2, "bwd", 0, None, {}),
        ("sync_wait", None, None, None, None, {"step": 0}),
        ("allreduce", None, None, None, 80, {}),
        ("combine", 1, "bwd", 0, 512.0, {}),
        ("expert", 1, "fwd", 1, None, {}),
        ("counts", 0, "fwd", None, 32.0, {}),
    ]


def test_newer_or_broken_lines_are_refused_with_the_fix(tmp_path):
    path = tmp_path / "timeline-rank0.jsonl"
    path.write_text(json.dumps({**V1_TRAINER[0], "v": schema.SCHEMA_VERSION + 1}) + "\n")
    with pytest.raises(LinaError, match="upgrade lina"):
        load_jsonl(path)
    path.write_text("{not json\n")
    with pytest.raises(LinaError, match="not JSON"):
        load_jsonl(path)
    with pytest.raises(LinaError, match="schema_version"):
        schema.summary_version({"schema_version": schema.SCHEMA_VERSION + 1})
    with pytest.raises(LinaError, match="unknown field"):
        schema.RunSetup.from_dict({"layers": 1, "colour": "red"})


def _trainer_step(rank: int, t: float, sent: float, received: float, typed: bool) -> list[Span]:
    """One step of a rank as the trainer records it: typed (this schema) or named (version 1)."""

    def span(name, cat, a, b, **fields):
        if typed:
            return Span(
                name,
                cat,
                t + a,
                t + b,
                rank,
                "main",
                {k: v for k, v in fields.items() if k == "step"},
                **{k: v for k, v in fields.items() if k != "step"},
            )
        args = {
            k: v for k, v in fields.items() if k in ("step", "bytes", "micro_op") or (k == "phase" and cat == "a2a")
        }
        return Span(name, cat, t + a, t + b, rank, "main", args)

    return [
        span("step", "step", 0.0, 1.0, kind="step", step=int(t)),
        span("forward", "compute", 0.0, 0.4, kind="forward", phase="fwd"),
        span("moe0.dispatch", "a2a", 0.05, 0.1, kind="dispatch", layer=0, phase="fwd", micro_op=0, bytes=sent),
        span("moe0.experts", "compute", 0.1, 0.2, kind="expert", layer=0, phase="fwd", micro_op=0),
        span("moe0.combine", "a2a", 0.2, 0.3, kind="combine", layer=0, phase="fwd", micro_op=0, bytes=received),
        span("backward", "compute", 0.4, 0.9, kind="backward", phase="bwd"),
        span("moe0.experts.bwd", "compute", 0.5, 0.6, kind="expert", layer=0, phase="bwd", micro_op=0),
        span("moe0.dispatch", "a2a", 0.6, 0.7, kind="dispatch", layer=0, phase="bwd", micro_op=0, bytes=sent),
        span("gradsync.finish", "sched", 0.9, 0.95, kind="sync_wait", step=int(t)),
    ]


def test_readers_agree_on_both_versions():
    """The breakdown, the packing controller's micro-op times and the routing skew read the
    same off typed spans as off the names version 1 wrote."""

    def spans(typed):
        return {
            r: [s for t in range(3) for s in _trainer_step(r, float(t), 4e3, 3e3 + 2e3 * r, typed)] for r in range(2)
        }

    old, new = spans(False), spans(True)
    assert breakdown_table(old[0] + old[1]) == breakdown_table(new[0] + new[1])
    assert forward_micro_ops(old[0]) == forward_micro_ops(new[0])
    assert forward_micro_ops(new[0]).ffn_ops == 3 and forward_micro_ops(new[0]).a2a_ops == 6
    assert a2a_skew(old) == a2a_skew(new) == pytest.approx(5e3 / 4e3)


def test_a_run_folder_calibrates_the_same_in_either_version(tmp_path):
    """A synthetic run folder (this schema) and the same run rewritten as version 1 wrote it
    (simulator names and args, a config-only summary) read into the same record."""
    from lina.sim.calibration import read_run
    from lina.testing.calibration import write_synthetic_run

    cluster = ClusterSpec(hosts=2, gpus_per_host=1, link_gbps=0.2, launch_s=1e-3, per_peer_s=0)
    model = ModelSpec(
        "tiny",
        layers=2,
        d_model=64,
        d_ff=128,
        experts=2,
        top_k=1,
        seq_len=32,
        batch_size=4,
        vocab=64,
        act_bytes=4,
        grad_bytes=4,
        param_bytes=4,
    )
    profile = ComputeProfile(1e-6, 2e-6, 1e-6, 2e-6, 1e-9)
    new = tmp_path / "new"
    write_synthetic_run(
        new, cluster, model, profile, TrainSpec(lina_a2a_chunks=2, count_exchange=True, a2a_skew=1.2), "lina", steps=3
    )
    old = tmp_path / "old"
    shutil.copytree(new, old)
    summary = json.loads((old / "summary.json").read_text())
    (old / "summary.json").write_text(
        json.dumps({"config": summary["config"], "step_time_s_median": summary["step_time_s_median"]})
    )
    for path in old.glob("timeline-rank*.jsonl"):
        lines = []
        for s in load_jsonl(path):
            args = dict(s.args)
            if s.kind in ("dispatch", "combine", "counts"):
                args.update(phase=s.kind, direction=s.phase, layer=s.layer, bytes=s.bytes)
                if s.micro_op is not None:
                    args["chunk"] = s.micro_op
            elif s.cat != "step" and s.kind not in ("forward", "backward"):
                args.update(
                    {
                        k: v
                        for k, v in (
                            ("kind", s.kind),
                            ("direction", s.phase),
                            ("layer", s.layer),
                            ("chunk", s.micro_op),
                            ("bytes", s.bytes),
                        )
                        if v is not None
                    }
                )
            lines.append(
                json.dumps(
                    {
                        "name": s.name,
                        "cat": s.cat,
                        "start_s": s.start_s,
                        "end_s": s.end_s,
                        "rank": s.rank,
                        "thread": s.thread,
                        "args": args,
                    }
                )
            )
        path.write_text("\n".join(lines) + "\n")
    a, b = read_run(new), read_run(old)
    assert (a.train, a.model.tokens, a.policy, a.ep_size, a.cpu_count, a.a2a_in_flight, a.measured_step_s) == (
        b.train,
        b.model.tokens,
        b.policy,
        b.ep_size,
        b.cpu_count,
        b.a2a_in_flight,
        b.measured_step_s,
    )
    assert a.train.count_exchange and a.a2a_skew == pytest.approx(1.2)
    assert {
        r: [(s.kind, s.layer, s.phase, s.micro_op, s.bytes) for s in v] for r, v in load_rank_timelines(new).items()
    } == {r: [(s.kind, s.layer, s.phase, s.micro_op, s.bytes) for s in v] for r, v in load_rank_timelines(old).items()}


def test_a_loopback_run_says_there_is_no_link_to_calibrate(tmp_path):
    from lina.sim.calibration import read_run

    setup = schema.RunSetup(
        layers=1, d_model=8, d_ff=8, experts=2, top_k=1, seq_len=4, batch_size=1, workers=2, policy="lina", chunk_mb=1.0
    )
    (tmp_path / "summary.json").write_text(json.dumps(schema.run_summary(setup, {}, 0.1)))
    with pytest.raises(LinaError, match="no link to calibrate"):
        read_run(tmp_path)

"""The timeline's bounded memory: dropping spans no measurement needs, and spilling them to a file."""

import json

from lina.obs.timeline import Timeline, load_jsonl


def _steps(tl: Timeline, n: int, first: int = 0) -> None:
    for k in range(first, first + n):
        tl.record("forward", "compute", k + 0.1, k + 0.5, step=k)
        tl.record("step", "step", float(k), k + 0.9, step=k)


def test_drop_before_keeps_open_and_later_spans():
    tl = Timeline(0)
    _steps(tl, 4)
    tl.record("allreduce", "allreduce", 1.5, 3.2)  # still in flight at 3.0
    assert tl.drop_before(3.0) == 6
    names = [(s.name, s.start_s) for s in tl.spans()]
    assert ("allreduce", 1.5) in names and ("step", 3.0) in names and ("step", 2.0) not in names
    assert tl.drop_before(0.0) == 0


def test_spill_file_holds_every_span_once(tmp_path):
    path = tmp_path / "trace" / "timeline-rank0.jsonl"
    tl = Timeline(0, spill_path=path)
    _steps(tl, 3)
    tl.drop_before(2.0)
    _steps(tl, 2, first=3)
    tl.drop_before(4.0)
    assert len(tl.spans()) == 2 and tl.spilled == 8
    tl.flush()
    spans = load_jsonl(path)
    assert [s.args["step"] for s in spans if s.cat == "step"] == [0, 1, 2, 3, 4]
    assert len(spans) == 10 and tl.spans() == []
    assert all(json.loads(line)["rank"] == 0 for line in path.read_text().splitlines())


def test_a_new_spill_file_starts_empty(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"stale": true}\n')
    tl = Timeline(1, spill_path=path)
    tl.flush()
    assert path.read_text() == ""


def test_without_spill_path_dropped_spans_are_gone(tmp_path):
    tl = Timeline(0)
    _steps(tl, 5)
    tl.drop_before(5.0)
    tl.flush()
    assert tl.spans() == [] and tl.spilled == 0


def test_rank_timelines_of_a_run_folder(tmp_path):
    from lina.obs.timeline import load_rank_timelines

    for rank in (0, 1, 10):
        tl = Timeline(rank)
        tl.record(f"op{rank}", "compute", 0.0, 1.0 + rank)
        tl.save_jsonl(tmp_path / f"timeline-rank{rank}.jsonl")
    spans = load_rank_timelines(tmp_path)
    assert sorted(spans) == [0, 1, 10]
    assert [s.name for s in spans[10]] == ["op10"] and spans[10][0].rank == 10
    assert load_rank_timelines(tmp_path / "missing") == {}

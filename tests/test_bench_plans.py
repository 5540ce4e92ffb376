"""The benchmarks' plan files: typed, frozen, readable JSON, and refused with a clear message when bad."""

import dataclasses
import json

import pytest

from lina.bench import contention_worker
from lina.bench.plan import ContentionPlan, InferBenchPlan, TrainBenchPlan
from lina.errors import LinaError

TRAIN = TrainBenchPlan(
    layout="flat",
    hosts=4,
    workers_per_host=1,
    link_bps=200_000_000,
    experts=(4, 8),
    policies=("deepspeed", "lina"),
    model={"d_model": 64, "n_layers": 2},
    batch_size=4,
    chunk_mb="auto",
    buckets=16,
    pipeline_chunks=2,
    seed=0,
    warmup=1,
    rounds=2,
    steps_per_round=1,
    out="runs/bench",
    packing_window=2,
)
INFER = InferBenchPlan(
    trace="held-out.npz",
    estimator="estimator.npz",
    layers=4,
    d_model=64,
    d_ff=128,
    tokens_per_rank=32,
    batches=3,
    warmup=1,
    policies=("static", "lina"),
    eplb_replan_every=4,
    seed=0,
    result="result.json",
    world=4,
)
CONTENTION = ContentionPlan(pairs=4, a2a_elems=1024, allreduce_elems=2048, out="raw.json", timeline_dir="tl")


@pytest.mark.parametrize("plan", [TRAIN, INFER, CONTENTION], ids=lambda p: p.KIND)
def test_a_plan_round_trips_through_its_file(plan, tmp_path):
    path = plan.save(tmp_path / "plan.json")
    assert type(plan).load(path) == plan
    text = path.read_text()
    assert json.loads(text)["plan"] == plan.KIND and text.count("\n") > len(dataclasses.fields(plan))  # a field a line
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(plan, dataclasses.fields(plan)[0].name, None)


def _refusal(text: str, tmp_path, cls=TrainBenchPlan) -> str:
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(LinaError) as err:
        cls.load(path)
    assert str(path) in str(err.value) and "Fix:" in str(err.value)
    return str(err.value)


def test_a_bad_plan_file_is_refused_with_the_field_and_the_fix(tmp_path):
    good = TRAIN.to_dict()
    assert "not JSON" in _refusal("{plan", tmp_path)
    assert "not a plan object" in _refusal("[1, 2]", tmp_path)
    assert "not of 'train'" in _refusal(INFER.to_json(), tmp_path)
    missing = {k: v for k, v in good.items() if k != "rounds"}
    assert "'rounds' is missing" in _refusal(json.dumps(missing), tmp_path)
    assert "unknown field 'round'" in _refusal(json.dumps({**good, "round": 3}), tmp_path)
    message = _refusal(json.dumps({**good, "experts": [4, "eight"]}), tmp_path)
    assert "'experts'" in message and "a list, each an integer" in message
    assert "not an integer" in _refusal(json.dumps({**good, "hosts": 4.5}), tmp_path)
    assert "not an integer" in _refusal(json.dumps({**good, "hosts": True}), tmp_path)
    with pytest.raises(LinaError, match="does not exist"):
        TrainBenchPlan.load(tmp_path / "missing.json")


def test_json_numbers_become_the_fields_types(tmp_path):
    plan = TrainBenchPlan.from_json(json.dumps({**TRAIN.to_dict(), "dilation": 2}))
    assert plan.dilation == 2.0 and isinstance(plan.dilation, float) and plan.experts == (4, 8)


def test_the_contention_worker_refuses_a_bad_plan_before_joining_a_group(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**CONTENTION.to_dict(), "pairs": "many"}))
    with pytest.raises(LinaError, match="'pairs'"):
        contention_worker.main([str(path)])

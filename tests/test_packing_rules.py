"""Expert packing, the pure parts: the --packing setting, the decision rule on synthetic timings,
reading micro-op times off a timeline, the layout move plan and the memory plan."""

import pytest

from lina.config import ModelConfig, PackingConfig, TrainConfig
from lina.errors import ConfigError
from lina.moe.experts import local_expert_ids
from lina.obs.timeline import Timeline
from lina.train.packing import (
    PackingController,
    PackingSpec,
    decide,
    forward_micro_ops,
    got_slower,
    measure_window,
    packing_ep_sizes,
    parse_packing,
    plan_residency,
    spans_of_steps,
    valid_experts_per_rank,
)
from lina.train.relayout import expert_sources


def test_parse_packing():
    assert parse_packing("off") == PackingSpec("off")
    assert parse_packing("AUTO") == PackingSpec("auto")
    assert parse_packing("2") == PackingSpec("fixed", 2, 0)
    assert parse_packing("4@10") == PackingSpec("fixed", 4, 10)
    for bad in ("fast", "0", "2@-1", "2@x", ""):
        with pytest.raises(ConfigError) as err:
            parse_packing(bad)
        assert err.value.field == "packing"


def test_config_rejects_impossible_packing():
    cfg = TrainConfig(model=ModelConfig(experts=8), workers=4, packing=PackingConfig(mode="3"))
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert err.value.field == "packing.mode" and "2, 4, 8" in err.value.fix
    TrainConfig(model=ModelConfig(experts=8), workers=4, packing=PackingConfig(mode="4@5")).validate()
    with pytest.raises(ConfigError):  # 2 experts per rank from the start means EP size 4, not 2
        TrainConfig(model=ModelConfig(experts=8), workers=4, ep_size=2, packing=PackingConfig(mode="2")).validate()
    with pytest.raises(ConfigError) as err:
        TrainConfig(packing=PackingConfig(every=0)).validate()
    assert err.value.field == "packing.every"
    with pytest.raises(ConfigError):
        TrainConfig(packing=PackingConfig(max_expert_memory_mb=-1)).validate()


def test_layouts():
    assert valid_experts_per_rank(4, 4) == [1, 2, 4]
    assert valid_experts_per_rank(16, 4) == [4, 8, 16]
    assert valid_experts_per_rank(6, 6) == [1, 2, 3, 6]
    assert packing_ep_sizes(parse_packing("auto"), 8, 8) == [8, 4, 2, 1]
    assert packing_ep_sizes(parse_packing("auto"), 6, 6) == [6, 3]
    assert packing_ep_sizes(parse_packing("off"), 4, 4) == [4]
    assert packing_ep_sizes(parse_packing("2"), 4, 4) == [2]
    assert packing_ep_sizes(parse_packing("2@3"), 4, 4) == [4, 2]


def test_decision_rule_on_synthetic_timings():
    # FFN micro-op shorter than the all-to-all micro-op: bubbles, so double.
    d = decide(1, ffn_per_op_s=0.002, a2a_per_op_s=0.010, can_double=True, fits=True)
    assert d.experts_per_rank == 2 and "pack" in d.reason
    assert decide(2, 0.002, 0.010, True, True).experts_per_rank == 4
    # FFN at least as long as the all-to-all: no bubble, keep.
    assert decide(2, 0.010, 0.010, True, True).experts_per_rank == 2
    assert decide(2, 0.020, 0.010, True, True).experts_per_rank == 2
    # Would pack, but no smaller EP group exists, or memory does not allow it.
    assert decide(4, 0.001, 0.010, False, True).experts_per_rank == 4
    d = decide(4, 0.001, 0.010, True, False)
    assert d.experts_per_rank == 4 and "max_expert_memory_mb" in d.reason
    # Nothing measured (e.g. no all-to-all left): keep.
    assert decide(4, 0.001, None, True, True).experts_per_rank == 4


def _fake_step(tl: Timeline, step: int, t0: float, ffn: float, a2a: float, ops: int = 2, tail: float = 1.0) -> float:
    """Two MoE layers of ``ops`` micro-ops each; ``tail`` seconds of the step after them."""
    t = t0
    for layer in range(2):
        for j in range(ops):
            tl.record(f"moe{layer}.dispatch", "a2a", t, t + a2a, phase="fwd", micro_op=j)
            tl.record(f"moe{layer}.experts", "compute", t + a2a, t + a2a + ffn, micro_op=j)
            tl.record(f"moe{layer}.combine", "a2a", t + a2a + ffn, t + 2 * a2a + ffn, phase="fwd", micro_op=j)
            tl.record(f"moe{layer}.combine", "a2a", t, t + 5 * a2a, phase="bwd", micro_op=j)  # not forward
            tl.record(f"moe{layer}.experts.bwd", "compute", t, t + 9 * ffn, micro_op=j)  # not forward
            t += 2 * a2a + ffn
    tl.record("counts", "a2a", t, t + 1.0, phase="fwd")  # not a micro-op of the exchange
    tl.record("step", "step", t0, t + tail, step=step)
    return t + tail + 1.0


def test_micro_op_times_from_the_timeline():
    tl = Timeline(0)
    t = _fake_step(tl, 0, 0.0, ffn=0.5, a2a=2.0)
    _fake_step(tl, 1, t, ffn=0.1, a2a=1.0)
    times = forward_micro_ops(spans_of_steps(tl.spans(), 1, 1))
    assert times.ffn_ops == 4 and times.a2a_ops == 8
    assert times.ffn_per_op_s == pytest.approx(0.1) and times.a2a_per_op_s == pytest.approx(1.0)
    both = forward_micro_ops(spans_of_steps(tl.spans(), 0, 1))
    assert both.ffn_ops == 8 and both.a2a_per_op_s == pytest.approx(1.5)


def _controller(mode: str, budget: int = 0) -> PackingController:
    return PackingController(parse_packing(mode), experts=8, base_ep=8, first_step=4, every=2, budget_bytes=budget)


def test_controller_schedule_and_decisions_single_process():
    """Decisions at steps 4, 6, 8, ...; each reads the previous ``every`` steps."""
    c = _controller("auto")
    assert [s for s in range(12) if c.due(s)] == [4, 6, 8, 10]
    tl, t = Timeline(0), 0.0
    for step in range(4):
        t = _fake_step(tl, step, t, ffn=0.1, a2a=1.0)
    assert c.target_ep(3, 8, tl, 100) == 8  # not due
    assert c.target_ep(4, 8, tl, 100) == 4  # FFN << all-to-all: 1 -> 2 experts per rank
    for step in range(4, 6):  # packed: all-to-all shorter, steps faster
        t = _fake_step(tl, step, t, ffn=0.5, a2a=0.2)
    assert c.target_ep(6, 4, tl, 100) == 4  # FFN >= all-to-all now: keep
    assert [h["new_experts_per_rank"] for h in c.history] == [2, 2]
    assert not c.settled and c.history[1]["step_ms"] < c.history[0]["step_ms"]
    assert c.history[0]["ffn_per_op_ms"] == pytest.approx(100.0) and c.history[0]["a2a_ops"] == 16  # steps 2 and 3
    # Memory: one layer's experts take 100 bytes; doubling needs 200 > budget 150.
    c = _controller("auto", budget=150)
    assert c.target_ep(4, 8, tl, 100) == 8 and "max_expert_memory_mb" in c.history[0]["reason"]


def test_a_doubling_that_makes_steps_slower_is_undone():
    assert got_slower(1.0, 1.06) and not got_slower(1.0, 1.04) and not got_slower(None, 2.0)
    c = _controller("auto")
    tl, t = Timeline(0), 0.0
    for step in range(4):
        t = _fake_step(tl, step, t, ffn=0.1, a2a=1.0)
    before = measure_window(tl.spans(), 2, 3)
    assert before.steps == 2 and before.step_mean_s == pytest.approx(9.4)
    assert c.target_ep(4, 8, tl, 100) == 4  # pack: 1 -> 2 experts per rank
    for step in range(4, 6):  # FFN still short, but whole steps got slower (e.g. the experts' allreduce)
        t = _fake_step(tl, step, t, ffn=0.1, a2a=0.5, tail=6.0)
    assert c.target_ep(6, 4, tl, 100) == 8  # back to 1 expert per rank
    assert c.settled and "slower" in c.history[-1]["reason"]
    for step in range(6, 8):
        t = _fake_step(tl, step, t, ffn=0.1, a2a=1.0)
    assert c.target_ep(8, 8, tl, 100) == 8  # settled: no more packing
    fresh = _controller("auto")
    fresh.load_state_dict(c.state_dict())
    assert fresh.settled and fresh.history == c.history


def test_controller_fixed_modes():
    c = _controller("2@5")
    assert c.initial_ep() == 8
    tl = Timeline(0)
    assert c.target_ep(4, 8, tl, 0) == 8
    assert c.target_ep(5, 8, tl, 0) == 4 and c.history[-1]["new_experts_per_rank"] == 2
    assert c.target_ep(9, 4, tl, 0) == 4
    assert _controller("4").initial_ep() == 2
    off = _controller("off")
    assert off.target_ep(100, 2, tl, 0) == 2  # off keeps whatever layout the run is in
    state = c.state_dict()
    fresh = _controller("2@5")
    fresh.load_state_dict(state)
    assert fresh.history == c.history


@pytest.mark.parametrize(
    "world,experts,old,new", [(4, 4, 4, 2), (4, 4, 2, 1), (4, 4, 1, 4), (8, 16, 8, 2), (4, 8, 2, 4)]
)
def test_move_plan_gets_every_new_expert_from_a_holder_in_the_old_ep_group(world, experts, old, new):
    sources = expert_sources(world, experts, old, new)
    for r in range(world):
        assert [e for _, e in sources[r]] == local_expert_ids(r, new, experts)
        for src, e in sources[r]:
            assert src // old == r // old  # inside r's old EP group: one all-to-all there suffices
            assert e in local_expert_ids(src, old, experts)


def test_residency_plan():
    assert plan_residency([10, 10, 10], 0) == [True, True, True]
    assert plan_residency([10, 10, 10], 25) == [True, True, False]
    assert plan_residency([10, 10, 10], 5) == [False, False, False]


def test_undoing_a_chain_of_doublings_returns_to_the_fastest_packing():
    """1 -> 2 costs a little (within the margin), 2 -> 4 costs more: back to 1, not to 2."""
    c = _controller("auto")
    tl, t = Timeline(0), 0.0
    for step in range(4):
        t = _fake_step(tl, step, t, ffn=0.1, a2a=1.0)
    assert c.target_ep(4, 8, tl, 100) == 4  # 1 -> 2 experts per rank
    for step in range(4, 6):
        t = _fake_step(tl, step, t, ffn=0.1, a2a=0.95, tail=1.5)  # about 3% slower: kept
    assert c.target_ep(6, 4, tl, 100) == 2  # still short FFN: 2 -> 4
    for step in range(6, 8):
        t = _fake_step(tl, step, t, ffn=0.1, a2a=0.9, tail=3.0)  # slower than 2 by more than the margin
    assert c.target_ep(8, 2, tl, 100) == 8  # the fastest measured was 1 expert per rank
    assert c.settled and "fastest" in c.history[-1]["reason"]
    assert set(c.step_s_by_packing) == {1, 2, 4}
    fresh = _controller("auto")
    fresh.load_state_dict(c.state_dict())
    assert fresh.step_s_by_packing == c.step_s_by_packing

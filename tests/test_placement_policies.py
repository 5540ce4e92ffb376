"""Lina's placement, its phase 2, the oracle and the EPLB baseline, as properties over random loads."""

import math

import pytest
import torch

from lina.errors import ConfigError
from lina.placement import (
    EPLBPlanner,
    eplb_placement,
    lina_placement,
    max_device_load,
    oracle_placement,
    replan_if_needed,
    static_placement,
    topset_equal,
)

CASES = [(e, n) for e in (4, 8, 16, 64) for n in (2, 4, 8, 16)]


def _load(seed: int, experts: int, concentration: float, zeros: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    load = (torch.distributions.Dirichlet(torch.full((experts,), concentration)).sample() * 1000).round()
    load[torch.rand(experts, generator=g) < zeros] = 0.0
    return load


@pytest.mark.parametrize("seed", range(48))
def test_lina_placement_properties(seed):
    experts, devices = CASES[seed % len(CASES)]
    load = _load(seed, experts, [0.3, 1.0, 5.0][seed % 3], zeros=0.25 if seed % 4 == 0 else 0.0)
    p = lina_placement(load, devices)
    cap = max(4, math.ceil(experts / devices))
    assert torch.allclose(p.share.sum(dim=1), torch.ones(experts, dtype=torch.float64))
    assert (p.replicas >= 1).all(), "every expert must be served"
    assert (p.experts_per_device <= cap).all()
    ids = torch.multinomial(load + 1.0, 200, replacement=True).reshape(100, 2)
    dev = p.route(ids)
    assert p.holds[ids.reshape(-1), dev.reshape(-1)].all()
    assert (
        max_device_load(oracle_placement(load, devices), load)
        <= max_device_load(static_placement(experts, devices), load) + 1e-9
    )


def test_hot_expert_is_replicated_and_cold_ones_are_packed():
    load = torch.tensor([600.0, 100, 100, 100, 50, 50, 0, 0])
    p = lina_placement(load, 8)
    assert p.replicas[0] >= 4
    # Busiest device carries no more than the ideal share plus the smallest packing unit.
    assert max_device_load(p, load) <= 1000 / 8 + 50 + 1e-9
    assert (p.experts_per_device <= 4).all()
    for idle in (6, 7):
        assert p.replicas[idle] == 1


def test_lina_beats_static_on_skewed_load_by_a_wide_margin():
    load = torch.tensor([400.0, 300, 100, 80, 60, 30, 20, 10])
    assert max_device_load(lina_placement(load, 8), load) < 0.5 * max_device_load(static_placement(8, 8), load)


def test_all_zero_load_falls_back_to_static_and_bad_input_is_rejected():
    p = lina_placement(torch.zeros(8), 4)
    assert torch.equal(p.share, static_placement(8, 4).share)
    with pytest.raises(ConfigError):
        lina_placement(torch.tensor([1.0, -1.0]), 2)
    with pytest.raises(ConfigError):
        lina_placement(torch.ones(4), 0)


def test_more_experts_than_the_packing_limit_allows():
    load = _load(3, 64, 1.0)
    p = lina_placement(load, 4, max_experts_per_device=4)  # 64 experts need 16 per device
    assert (p.replicas >= 1).all() and (p.experts_per_device <= 16).all()


def test_phase2_keeps_a_right_plan_and_replans_a_wrong_one():
    est = torch.tensor([50.0, 40, 30, 20, 5, 4, 3, 2])
    planned = lina_placement(est, 4)
    same, replanned = replan_if_needed(planned, est, est * 2, top_k=2)
    assert not replanned and same is planned
    real = torch.tensor([2.0, 3, 4, 5, 20, 30, 40, 50])
    fixed, replanned = replan_if_needed(planned, est, real, top_k=2)
    assert replanned
    assert max_device_load(fixed, real) < max_device_load(planned, real)


def test_topset_equal_forgives_ties_only():
    real = torch.tensor([5.0, 5.0, 5.0, 1.0])
    assert topset_equal(torch.tensor([0.0, 1.0, 2.0, 0.0]), real, 2)  # any two of the tied three
    assert not topset_equal(torch.tensor([0.0, 0.0, 1.0, 2.0]), real, 2)
    assert topset_equal(torch.rand(4), real, 4)


@pytest.mark.parametrize("seed", range(12))
def test_eplb_placement_fills_every_slot(seed):
    experts, devices = CASES[seed % len(CASES)]
    load = _load(seed, experts, 0.5)
    slots = math.ceil(experts / devices) + 1
    p = eplb_placement(load, devices, slots)
    assert (p.replicas >= 1).all()
    assert (p.experts_per_device <= slots).all()
    assert max_device_load(p, load) <= max_device_load(static_placement(experts, devices), load) + 1e-9
    with pytest.raises(ConfigError):
        eplb_placement(load, devices, slots_per_device=0)


def test_eplb_replicates_the_heaviest_expert():
    p = eplb_placement(torch.tensor([100.0, 10, 10, 10]), 4, slots_per_device=2)
    assert p.replicas[0] >= 3


def test_eplb_planner_replans_on_its_cadence_from_the_window_average():
    planner = EPLBPlanner(4, 2, window=2, replan_every=3)
    static = planner.placement
    hot = torch.tensor([90.0, 5, 3, 2])
    assert [planner.observe(hot) for _ in range(3)] == [False, False, True]
    assert planner.replans == 1 and planner.placement is not static
    assert planner.placement.replicas[0] >= 2
    with pytest.raises(ConfigError):
        planner.observe(torch.ones(3))
    with pytest.raises(ConfigError):
        EPLBPlanner(4, 2, window=0)


def test_eplb_planner_plans_when_read_from_the_window_at_the_replan():
    lazy, eager = EPLBPlanner(4, 2, window=2, replan_every=2), EPLBPlanner(4, 2, window=2, replan_every=2)
    first, later = torch.tensor([90.0, 5, 3, 2]), torch.tensor([2.0, 3, 5, 90])
    for counts in (first, first):
        lazy.observe(counts)
        eager.observe(counts)
    planned = eager.placement  # read at the re-plan
    lazy.observe(later)  # the window moves on before anyone reads the lazy plan; no re-plan is due
    assert torch.equal(lazy.placement.share, planned.share)
    assert torch.equal(planned.share, eplb_placement(first, 2, lazy.slots_per_device).share)

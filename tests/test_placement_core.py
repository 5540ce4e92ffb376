"""Placement: validation, routing of token-slots to replicas, device loads, the static layout."""

import pytest
import torch

from lina.errors import ConfigError
from lina.placement import Placement, imbalance, max_device_load, static_placement


def _random_placement(seed: int, experts: int, devices: int) -> Placement:
    g = torch.Generator().manual_seed(seed)
    share = torch.rand(experts, devices, generator=g)
    share[torch.rand(experts, devices, generator=g) < 0.6] = 0.0
    share[torch.arange(experts), torch.randint(0, devices, (experts,), generator=g)] += 0.1
    return Placement(experts, devices, share / share.sum(dim=1, keepdim=True))


def test_validation_names_the_problem():
    with pytest.raises(ConfigError, match="shape"):
        Placement(2, 2, torch.ones(2, 3) / 3)
    with pytest.raises(ConfigError, match="sums to"):
        Placement(2, 2, torch.tensor([[1.0, 0.0], [0.5, 0.2]]))
    with pytest.raises(ConfigError, match="negative"):
        Placement(2, 2, torch.tensor([[1.5, -0.5], [0.5, 0.5]]))


def test_structure_accessors():
    p = Placement(3, 2, torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]))
    assert p.expert_devices(0).tolist() == [0, 1]
    assert p.device_experts(0).tolist() == [0, 1]
    assert p.experts_per_device.tolist() == [2, 2]
    assert p.replicas.tolist() == [2, 1, 1]
    assert p.device_load(torch.tensor([10.0, 4.0, 2.0])).tolist() == [9.0, 7.0]
    assert max_device_load(p, torch.tensor([10.0, 4.0, 2.0])) == 9.0
    assert imbalance(p, torch.tensor([10.0, 4.0, 2.0])) == pytest.approx(9.0 / 8.0)


@pytest.mark.parametrize("seed", range(20))
def test_route_sends_every_slot_to_a_holder_in_share_proportion(seed):
    experts, devices = 8 + seed % 5, 2 + seed % 6
    p = _random_placement(seed, experts, devices)
    g = torch.Generator().manual_seed(100 + seed)
    ids = torch.randint(0, experts, (97, 2), generator=g)
    dev = p.route(ids)
    assert dev.shape == ids.shape
    assert p.holds[ids.reshape(-1), dev.reshape(-1)].all()
    counts = torch.bincount(ids.reshape(-1), minlength=experts).double()
    for e in range(experts):
        got = torch.bincount(dev.reshape(-1)[ids.reshape(-1) == e], minlength=devices).double()
        # Each replica gets its share of the expert's slots, up to rounding of the block boundaries.
        assert (got - p.share[e] * counts[e]).abs().max() <= 1.0 + 1e-9
    assert torch.equal(p.route(ids), dev)  # deterministic


def test_route_keeps_token_order_within_a_replica():
    p = Placement(1, 3, torch.tensor([[0.5, 0.25, 0.25]]))
    dev = p.route(torch.zeros(8, 1, dtype=torch.long)).flatten()
    assert dev.tolist() == [0, 0, 0, 0, 1, 1, 2, 2]


def test_route_rejects_unknown_experts_and_handles_empty_batches():
    p = static_placement(4, 2)
    with pytest.raises(ConfigError):
        p.route(torch.tensor([[4]]))
    assert p.route(torch.zeros(0, 2, dtype=torch.long)).shape == (0, 2)


def test_static_layout_round_robin_and_replicated():
    p = static_placement(8, 4)
    assert [p.expert_devices(e).tolist() for e in range(8)] == [[e % 4] for e in range(8)]
    assert p.experts_per_device.tolist() == [2, 2, 2, 2]
    q = static_placement(2, 4)
    assert q.expert_devices(0).tolist() == [0, 2] and q.expert_devices(1).tolist() == [1, 3]
    assert q.share.dtype == torch.float64 and torch.allclose(q.share.sum(dim=1), torch.ones(2, dtype=torch.float64))

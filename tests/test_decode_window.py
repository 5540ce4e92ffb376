"""Placement per decode window: residents planned once per window (replicas in spare slots,
unpopular experts packed, more than 4 experts per device where the model has them), each step's
tokens routed among the resident replicas only, weights moving only at window boundaries."""

import numpy as np
import torch

from lina.infer.policies import ServingContext, serving_policy
from lina.infer.replay import replay_policy
from lina.placement.core import Placement, max_device_load
from lina.placement.window import route_among_resident


def test_routing_among_residents_keeps_the_holdings_and_levels_the_load():
    # expert 0 on devices 0 and 1; expert 1 on device 0 only, expert 2 on device 1 only
    share = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    resident = Placement(3, 2, share)
    counts = torch.tensor([10.0, 6.0, 0.0])
    step = route_among_resident(resident, counts)
    assert not (step.holds & ~resident.holds).any()  # nothing outside the residents
    assert max_device_load(step, counts) == 8.0 < max_device_load(resident, counts) == 11.0


def _replay(name: str, experts: torch.Tensor, num_experts: int, devices: int, window: int = 4):
    ctx = ServingContext(num_experts, devices, 2, experts.shape[1], decode_window=window)
    policy = serving_policy(name, ctx)
    return policy, replay_policy(policy, experts, list(range(experts.shape[1])), 8)


def _skewed(num_experts: int, tokens: int = 1024, layers: int = 2, seed: int = 0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, num_experts + 1) ** 1.3
    p /= p.sum()
    ids = np.stack([[g.choice(num_experts, 2, replace=False, p=p) for _ in range(layers)] for _ in range(tokens)])
    return torch.from_numpy(ids).long()  # [T, L, 2]


def test_window_policy_moves_weights_only_at_window_boundaries_and_beats_static():
    experts = _skewed(8)
    policy, rep = _replay("lina-window", experts, 8, 4, window=4)
    _, static = _replay("static", experts, 8, 4)
    assert policy.steps == 128 and policy.stats["moves"] > 0
    assert np.mean(rep.imbalance[2 * 4 * 2 :]) < np.mean(static.imbalance[2 * 4 * 2 :])  # after the first window
    assert rep.sources == [{"window": 128}] * 2


def test_more_than_four_experts_per_device_for_fine_grained_models():
    experts = _skewed(64, tokens=512)
    policy, _ = _replay("lina-window", experts, 64, 4, window=8)
    held = policy.resident[0].experts_per_device
    assert int(held.max()) > 4 and int(held.sum()) > 64  # 16+ per device, spare slots hold replicas


def test_the_engine_moves_the_next_windows_weights_ahead_and_outputs_stay_the_same():
    from lina.infer.engine import InferenceEngine, LayerRouting
    from lina.infer.policies import make_serving_policy
    from lina.infer.store import ExpertStore

    store = ExpertStore.random(2, 8, 16, 32, seed=0)
    ctx = ServingContext(8, 1, 2, 2, decode_window=2)
    window = InferenceEngine(store, 2, None, serving_policy("lina-window", ctx))
    static = InferenceEngine(
        ExpertStore.random(2, 8, 16, 32, seed=0), 2, None, make_serving_policy("static", 8, 1, 2, 2)
    )
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        h = torch.randn(6, 16, generator=g)
        ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(6)])
        gate = lambda j, x: LayerRouting(ids, torch.full((6, 2), 0.5))  # noqa: E731
        dense = lambda j, x: (x, x)  # noqa: E731
        out_w, _ = window.run_batch(h, dense, gate)
        out_s, _ = static.run_batch(h, dense, gate)
        torch.testing.assert_close(out_w, out_s, atol=1e-5, rtol=0)
        if step == 1:  # the first window's last step: the next residents are moving already
            assert set(store._resident) == {0, 1}

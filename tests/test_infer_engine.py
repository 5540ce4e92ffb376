"""The inference engine over 4 Gloo ranks: every placement policy gives the outputs of the plain
model (static placement, and one process), and devices that get no token still take part."""

import pytest
import torch

from lina.config import ModelConfig
from lina.infer.engine import InferenceEngine
from lina.infer.model_adapter import ServedGPT, record_routing
from lina.infer.policies import make_serving_policy
from lina.models.gpt import MoEGPT
from lina.placement.estimators import PathEstimator
from lina.testing.multiproc import run_ranks

CFG = ModelConfig(d_model=32, n_layers=4, n_heads=2, d_ff=64, seq_len=16, experts=8, top_k=2)
ATOL = 1e-5  # expert rows are computed in different groupings on different devices


def _model() -> MoEGPT:
    torch.manual_seed(0)
    return MoEGPT(CFG).eval()


def _tokens(rank: int, batch: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, CFG.seq_len), generator=torch.Generator().manual_seed(1000 * batch + rank))


def _estimator() -> PathEstimator:
    model = _model()
    trace = record_routing(model, [_tokens(r, 99) for r in range(8)], "test")
    return PathEstimator(path_len=2).fit(trace)


def _serve(rank, world, estimator):
    import torch.distributed as dist

    model = _model()
    served = ServedGPT(model)
    out = {}
    for name in ("static", "eplb", "lina", "oracle"):
        policy = make_serving_policy(
            name, CFG.experts, world, CFG.top_k, CFG.n_layers, estimator=estimator, eplb_replan_every=1
        )
        engine = InferenceEngine(served.store, CFG.top_k, dist.group.WORLD, policy)
        logits = []
        with torch.no_grad():
            for batch in range(3):
                h, stats = engine.run_batch(served.embed(_tokens(rank, batch)), served.dense, served.gate)
                logits.append(served.logits(h))
        out[name] = torch.stack(logits)
        out[name + "_stats"] = policy.stats
    with torch.no_grad():
        out["reference"] = torch.stack([model(_tokens(rank, b)) for b in range(3)])
    return out


@pytest.mark.slow
def test_every_policy_gives_the_plain_models_outputs():
    results = run_ranks(_serve, 4, _estimator(), timeout_s=120)
    for rank, res in enumerate(results):
        for name in ("static", "eplb", "lina", "oracle"):
            torch.testing.assert_close(res[name], res["reference"], atol=ATOL, rtol=0, msg=f"rank {rank} {name}")
    assert results[0]["lina_stats"]["checked"] > 0  # phase 2 ran on planned layers


def _skewed(rank, world):
    """All tokens route to experts 0 and 1: under static placement devices 2 and 3 receive
    nothing but still take part in every collective."""
    import torch.distributed as dist

    from lina.infer.engine import LayerRouting
    from lina.infer.store import ExpertStore

    store = ExpertStore.random(3, 4, 8, 16)
    policy = make_serving_policy("static", 4, world, 2, 3)
    engine = InferenceEngine(store, 2, dist.group.WORLD, policy)
    t = 6
    ids = torch.tensor([[0, 1]] * t)
    gate = lambda layer, h: LayerRouting(ids, torch.full((t, 2), 0.5))  # noqa: E731
    dense = lambda layer, h: (h, h)  # noqa: E731
    h, stats = engine.run_batch(torch.randn(t, 8, generator=torch.Generator().manual_seed(rank)), dense, gate)
    return stats.max_device_rows


@pytest.mark.slow
def test_devices_without_tokens_take_part():
    rows = run_ranks(_skewed, 4, timeout_s=60)
    assert all(r == 0 for r in rows[2]) and all(r == 0 for r in rows[3])
    assert all(r > 0 for r in rows[0])


def test_replica_rows_match_route():
    """What a receiver computes from counts alone equals what senders route (no extra exchange)."""
    from lina.infer.engine import replica_rows
    from lina.placement.lina import lina_placement

    gen = torch.Generator().manual_seed(3)
    for trial in range(20):
        e, n = 8, 4
        load = torch.rand(e, generator=gen) ** 3 * 100
        placement = lina_placement(load, n)
        ids = [
            torch.randint(0, e, (int(torch.randint(0, 40, (1,), generator=gen)), 2), generator=gen) for _ in range(n)
        ]
        counts = torch.stack([torch.bincount(i.reshape(-1), minlength=e).double() for i in ids])
        expected = replica_rows(counts, placement)
        for s, i in enumerate(ids):
            dev = placement.route(i).reshape(-1)
            got = torch.zeros(e, n, dtype=torch.long)
            got.index_put_((i.reshape(-1), dev), torch.ones_like(dev), accumulate=True)
            assert torch.equal(got, expected[s]), trial

"""All-to-all skew read from timelines, and what it does to a simulated step."""

from __future__ import annotations

import pytest

from lina.errors import ConfigError
from lina.obs.timeline import Span
from lina.sim.a2a_skew import a2a_skew
from lina.sim.compute import ComputeProfile
from lina.sim.spec import ClusterSpec, ModelSpec, TrainSpec
from lina.sim.train import simulate_step


def trainer_spans(rank: int, sent: list[float], received: list[float]) -> list[Span]:
    """A rank's forward dispatch/combine spans in the trainer's naming, one pair per layer, plus
    the token-count exchange and backward spans (which the skew must ignore)."""
    spans, t = [], 0.0
    for layer, (out, back) in enumerate(zip(sent, received)):
        spans.append(Span("counts", "a2a", t, t + 0.001, rank, "main", {"phase": "fwd", "bytes": 96}))
        spans.append(
            Span(f"moe{layer}.dispatch", "a2a", t + 0.01, t + 0.02, rank, "main", {"phase": "fwd", "bytes": out})
        )
        spans.append(
            Span(f"moe{layer}.combine", "a2a", t + 0.03, t + 0.04, rank, "main", {"phase": "fwd", "bytes": back})
        )
        spans.append(
            Span(f"moe{layer}.combine", "a2a", t + 0.05, t + 0.06, rank, "main", {"phase": "bwd", "bytes": 10 * out})
        )
        t += 0.1
    return spans


def test_skew_is_the_busiest_rank_over_the_mean_sender():
    # layer 0: every rank sends 4 kB, rank 2 receives 7 kB (others 3 kB): busiest 7 / mean 4
    # layer 1: rank 0 sends 8 kB, the others 4 kB; receives are even (5 kB): busiest 8 / mean 5
    sent = {0: [4e3, 8e3], 1: [4e3, 4e3], 2: [4e3, 4e3], 3: [4e3, 4e3]}
    received = {0: [3e3, 5e3], 1: [3e3, 5e3], 2: [7e3, 5e3], 3: [3e3, 5e3]}
    spans = {r: trainer_spans(r, sent[r], received[r]) for r in range(4)}
    assert a2a_skew(spans) == pytest.approx((7e3 + 8e3) / (4e3 + 5e3))
    # as two hosts of two ranks: host 1 receives 10 kB in layer 0 and host 0 sends 12 kB in layer 1
    assert a2a_skew(spans, ranks_per_unit=2) == pytest.approx((10e3 + 12e3) / (8e3 + 10e3))


def test_uniform_or_missing_exchanges_give_one():
    even = {r: trainer_spans(r, [4e3, 4e3], [4e3, 4e3]) for r in range(4)}
    assert a2a_skew(even) == 1.0
    assert a2a_skew({0: trainer_spans(0, [4e3], [9e3])}) == 1.0  # one rank: nothing to compare
    assert a2a_skew({r: [] for r in range(4)}) == 1.0


def _step(skew: float, gbps: float = 0.1) -> float:
    cluster = ClusterSpec(hosts=4, gpus_per_host=1, link_gbps=gbps, launch_s=0.0, per_peer_s=0.0)
    model = ModelSpec(
        "tiny", layers=2, d_model=128, d_ff=256, experts=4, top_k=1, seq_len=64, batch_size=4, vocab=64, act_bytes=4
    )
    profile = ComputeProfile(1e-9, 1e-9, 1e-9, 1e-9, 1e-12)
    return simulate_step(cluster, model, profile, TrainSpec(a2a_skew=skew), "ddp-overlap")


def test_skewed_all_to_alls_move_the_busiest_ranks_bytes():
    uniform, skewed = _step(1.0), _step(1.5)
    assert skewed.fwd_a2a_s == pytest.approx(1.5 * uniform.fwd_a2a_s, rel=1e-6)
    assert skewed.bwd_a2a_s == pytest.approx(1.5 * uniform.bwd_a2a_s, rel=1e-6)
    # what the spans record stays the mean rank's bytes, as the trainer records a rank's
    recorded = lambda r: sorted(t.args["bytes"] for t in r.tasks if t.cat == "a2a")  # noqa: E731
    assert recorded(skewed) == recorded(uniform)


def test_skew_below_one_is_refused():
    with pytest.raises(ConfigError, match="a2a_skew"):
        TrainSpec(a2a_skew=0.8)

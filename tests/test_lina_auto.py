"""``lina-auto``: each batch is served by the placement (lina, static, eplb) that gave the lowest
agreed step latency on batches of its size; the outputs stay the plain model's and every rank
makes the same choice."""

import pytest
import torch

from lina.config import ModelConfig
from lina.infer.arm_choice import FastestArm, batch_class
from lina.infer.engine import InferenceEngine
from lina.infer.model_adapter import ServedGPT, record_routing
from lina.infer.policies import AutoPolicy, ServingContext, serving_policy
from lina.models.gpt import MoEGPT
from lina.placement.estimators import PathEstimator
from lina.testing.multiproc import run_ranks

CFG = ModelConfig(d_model=32, n_layers=3, n_heads=2, d_ff=64, seq_len=16, experts=8, top_k=2)


def _serve_one(chooser: FastestArm, klass: int, latency_of: dict[str, float]) -> str:
    arm = chooser.choose(klass)
    chooser.observe(klass, arm, latency_of[arm])
    return arm


def test_fastest_arm_tries_each_then_serves_the_fastest_and_probes_rarely():
    chooser = FastestArm(("lina", "static", "eplb"), probe_every=8)
    latency = {"lina": 3.0, "static": 1.0, "eplb": 2.0}
    served = [_serve_one(chooser, 5, latency) for _ in range(64)]
    assert served[:3] == ["lina", "static", "eplb"]  # each once, in the preferred order
    assert served.count("static") >= 64 - 3 - 64 // 8 and served.count("static") < 64
    probes = [i for i, arm in enumerate(served[3:], start=3) if arm != "static"]
    assert all(i % 8 == 7 for i in probes)  # one batch in eight, at most
    assert {served[i] for i in probes} == {"lina", "eplb"}  # the one measured longest ago


def test_fastest_arm_follows_a_change_and_keeps_classes_apart():
    chooser = FastestArm(("lina", "static"), probe_every=4, decay=0.5)
    for _ in range(12):
        _serve_one(chooser, 10, {"lina": 1.0, "static": 2.0})  # large batches: lina pays
        _serve_one(chooser, 5, {"lina": 2.0, "static": 1.0})  # small ones: it does not
    assert chooser.choose(10) == "lina" and chooser.choose(5) == "static"
    for _ in range(24):  # lina's planning becomes expensive on large batches too
        _serve_one(chooser, 10, {"lina": 4.0, "static": 2.0})
    assert chooser.choose(10) == "static"
    report = chooser.report()
    assert set(report) == {"<=32 tokens", "<=1024 tokens"} and report["<=1024 tokens"]["lina"]["batches"] > 0


@pytest.mark.parametrize(
    "arms,kwargs,message",
    [
        (("a", "a"), {}, "distinct"),
        (("a",), {"probe_every": 1}, "at least 2"),
        (("a",), {"decay": 1.0}, "decay"),
        (("a",), {"margin": -0.1}, "margin"),
    ],
)
def test_fastest_arm_refuses_bad_settings(arms, kwargs, message):
    with pytest.raises(ValueError, match=message):
        FastestArm(arms, **kwargs)


def test_a_lucky_step_does_not_hand_over_within_the_margin():
    chooser = FastestArm(("static", "eplb"), probe_every=4, decay=0.5, margin=0.05)
    _serve_one(chooser, 3, {"static": 1.00, "eplb": 9.0})
    _serve_one(chooser, 3, {"static": 9.0, "eplb": 1.02})  # eplb's first step was lucky: 2% slower
    assert chooser.choose(3) == "static"
    for _ in range(3):  # eplb really is faster now, by much more than the margin
        chooser.observe(3, "eplb", 0.5)
    assert chooser.choose(3) == "eplb"


def test_batch_class_separates_decode_from_prefill():
    assert batch_class(1) == 0 and batch_class(32) == 5 and batch_class(33) == 6 and batch_class(1024) == 10


def _estimator() -> PathEstimator:
    torch.manual_seed(0)
    model = MoEGPT(CFG).eval()
    gen = torch.Generator().manual_seed(5)
    return PathEstimator(path_len=2).fit(
        record_routing(model, [torch.randint(0, 256, (2, CFG.seq_len), generator=gen) for _ in range(4)], "t")
    )


def test_auto_policy_serves_the_chosen_arm_and_reports_its_sources():
    policy = serving_policy("lina-auto", ServingContext(8, 2, 2, 3, estimator=_estimator()))
    assert isinstance(policy, AutoPolicy) and policy.wants_step_latency
    counts = torch.tensor([9.0, 1, 1, 1, 1, 1, 1, 1])  # 16 token-slots: 8 tokens, class 3
    chosen = []
    for latency in (3.0, 1.0, 2.0, 1.0):  # lina, static, eplb tried; then static is fastest
        policy.begin_batch(None)
        placements = [policy.placement(layer, counts) for layer in range(3)]
        chosen.append(policy.active)
        if policy.active == "static":
            assert all(torch.equal(p.share, placements[0].share) for p in placements)
        policy.end_batch(torch.stack([counts] * 3))
        policy.observe_step_latency(latency)
    assert chosen == ["lina", "static", "eplb", "static"]
    sources = policy.source_report(3)
    assert sources[1]["static"] == 2 and sources[1]["history"] == 1 and sources[0]["real"] == 1
    assert policy.arm_report()["<=8 tokens"]["static"]["batches"] == 2
    assert policy.local_estimate(1, torch.zeros(4, 1, dtype=torch.long)) is None  # static serves: no phase 1
    policy.begin_batch(None)  # the next step's first layer: static served this class last, so no phase 1
    assert policy.active is None and policy.local_estimate(1, torch.zeros(4, 1, dtype=torch.long)) is None
    assert set(policy.arm_report()) == {"<=8 tokens"}  # guessing the arm records nothing


def _tokens(rank: int, batch: int) -> torch.Tensor:
    rows = 2 if batch % 3 else 1  # two classes of batch size, as prefill and decode
    return torch.randint(0, 256, (rows, CFG.seq_len), generator=torch.Generator().manual_seed(100 * batch + rank))


def _serve(rank, world, estimator):
    import torch.distributed as dist

    torch.manual_seed(0)
    model = MoEGPT(CFG).eval()
    served = ServedGPT(model)
    policy = serving_policy("lina-auto", ServingContext(CFG.experts, world, CFG.top_k, CFG.n_layers, estimator))
    engine = InferenceEngine(served.store, CFG.top_k, dist.group.WORLD, policy)
    chosen, diffs = [], []
    with torch.no_grad():
        for batch in range(12):
            tokens = _tokens(rank, batch)
            h, _ = engine.run_batch(served.embed(tokens), served.dense, served.gate)
            diffs.append(float((served.logits(h) - model(tokens)).abs().max()))
            chosen.append(policy.active)
    return {"chosen": chosen, "max_diff": max(diffs), "arms": policy.arm_report()}


def test_lina_auto_keeps_the_outputs_and_every_rank_chooses_the_same():
    results = run_ranks(_serve, 2, _estimator(), timeout_s=120)
    assert results[0]["chosen"] == results[1]["chosen"]
    assert set(results[0]["chosen"]) == {"lina", "static", "eplb"}  # every arm was measured
    assert results[0]["arms"] == results[1]["arms"]  # the same agreed latencies on both ranks
    assert all(r["max_diff"] < 1e-4 for r in results), [r["max_diff"] for r in results]

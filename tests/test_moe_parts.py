"""The typed MoE parts: router options (normalisation, sigmoid scores, correction bias, groups,
scaling, capacity conventions, balance loss), SwiGLU experts (per expert, grouped, offloaded) and
shared experts."""

import pytest
import torch

from lina.moe.experts import LocalExperts, grouped_mm_supported
from lina.moe.layer import MoELayer
from lina.moe.router import TopKRouter, balance_loss, expert_capacity
from lina.moe.spec import ExpertSpec, MoESpec, RouterSpec, SharedExpertSpec

D, E = 16, 8


def _x(t=32, seed=0):
    return torch.randn(t, D, generator=torch.Generator().manual_seed(seed))


def _router(top_k=2, **spec):
    torch.manual_seed(0)
    return TopKRouter(D, E, top_k, spec=RouterSpec(**spec))


def test_norm_topk_prob_options():
    x = _x()
    probs = (x @ _router().gate.weight.t()).softmax(-1)
    top = probs.topk(2, -1)[0]
    torch.testing.assert_close(_router(norm_topk_prob=False)(x).weights, top)
    torch.testing.assert_close(_router()(x).weights, top / top.sum(-1, keepdim=True))  # lina default, k > 1
    assert torch.equal(_router(top_k=1, norm_topk_prob=True)(x).weights, torch.ones(32, 1))  # Mixtral, k = 1
    torch.testing.assert_close(_router(top_k=1)(x).weights, probs.max(-1, keepdim=True)[0])  # Switch


def test_sigmoid_correction_bias_selects_but_does_not_weigh():
    r = _router(score="sigmoid", correction_bias=True, norm_topk_prob=False)
    with torch.no_grad():
        r.correction_bias[5] = 10.0
    x = _x()
    routing = r(x)
    assert bool((routing.expert_ids == 5).any(-1).all())  # the bias forces expert 5 into every choice
    scores = (x @ r.gate.weight.t()).sigmoid()
    torch.testing.assert_close(routing.weights, scores.gather(1, routing.expert_ids))  # no bias in the weights


def test_group_limited_top_k_stays_in_the_best_groups():
    r = _router(score="sigmoid", correction_bias=True, n_group=4, topk_group=1)
    routing = r(_x(64))
    groups = routing.expert_ids // 2
    assert bool((groups[:, 0] == groups[:, 1]).all())  # both choices in the one chosen group
    scores = routing.probs.view(64, 4, 2).sum(-1)  # two experts per group: the group score is their sum
    assert torch.equal(groups[:, 0], scores.argmax(-1))


def test_routed_scaling_factor():
    w = _router(score="sigmoid", correction_bias=True, norm_topk_prob=True, routed_scaling_factor=2.5)(_x()).weights
    torch.testing.assert_close(w.sum(-1), torch.full((32,), 2.5))


def test_capacity_floor():
    assert expert_capacity(4, 8, 1, 1.0) == 1
    assert expert_capacity(4, 8, 1, 1.0, min_capacity=4) == 4
    torch.manual_seed(0)
    r = TopKRouter(D, E, 1, capacity_factor=1.0, dropless=False, spec=RouterSpec(min_capacity=32))
    assert bool(r(_x()).kept.all())


def _dropping_router(**spec):
    torch.manual_seed(0)
    r = TopKRouter(D, E, 2, capacity_factor=0.25, dropless=False, spec=RouterSpec(**spec))
    return r


def test_renormalise_after_drop_against_before():
    x = _x()
    gshard, deepspeed = _dropping_router()(x), _dropping_router(renormalize_after_drop=True)(x)
    assert torch.equal(gshard.kept, deepspeed.kept)
    one_kept = gshard.kept.sum(-1) == 1
    assert bool(one_kept.any())
    # DeepSpeed: a token left with one expert gets all of it; GShard: its share of both
    torch.testing.assert_close(deepspeed.weights[one_kept].sum(-1), torch.ones(int(one_kept.sum())))
    assert bool((gshard.weights[one_kept].sum(-1) < 1 - 1e-3).all())
    both = gshard.kept.all(-1)
    torch.testing.assert_close(gshard.weights[both], deepspeed.weights[both])


def test_first_choice_only_balance_loss():
    torch.manual_seed(0)
    r = TopKRouter(D, E, 2, balance_loss_weight=1.0, spec=RouterSpec(balance_first_choice_only=True))
    routing = r(_x())
    expected = balance_loss(routing.probs, routing.expert_ids[:, :1], E)
    f1 = torch.bincount(routing.expert_ids[:, 0], minlength=E).float() / 32
    torch.testing.assert_close(expected, E * (f1 * routing.probs.mean(0)).sum())
    torch.testing.assert_close(routing.aux_loss, expected)
    assert not torch.allclose(expected, balance_loss(routing.probs, routing.expert_ids, E))


@pytest.mark.parametrize("rate", [0.0, 0.01])
def test_correction_bias_update_moves_toward_balance(rate):
    """Every token first picks expert 0 (busiest / mean load = 4); with the update the bias
    lowers expert 0 and raises the idle ones until the load is within 2x of the mean; with a
    zero rate nothing changes."""
    r = _router(score="sigmoid", correction_bias=True, bias_update_rate=rate)
    with torch.no_grad():
        r.gate.weight[0] += 0.1
    x = _x(64).abs()
    r.train()
    imbalance = []
    for _ in range(60):
        r(x)
        load = r.update_correction_bias()
        imbalance.append(float(load.max() / load.mean()))
        assert float(r.load.sum()) == 0.0  # the count restarts after each update
    assert imbalance[0] == 4.0
    if rate == 0:
        assert imbalance[-1] == 4.0 and float(r.correction_bias.abs().sum()) == 0.0
    else:
        assert max(imbalance[-10:]) <= 2.0
        assert float(r.correction_bias[0]) < 0 < float(r.correction_bias[1:].mean())


def _swiglu(num_local=4, grouped=False, d_ff=8):
    torch.manual_seed(0)
    return LocalExperts(num_local, D, d_ff, list(range(num_local)), spec=ExpertSpec("swiglu", grouped_mm=grouped))


def _run(experts, counts, seed=1):
    rows = _x(sum(counts), seed).requires_grad_()
    y = experts(rows, counts)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
    return y.detach(), rows.grad, [w.grad.clone() for w in experts.weights()]


@pytest.mark.parametrize("counts", [[5, 0, 7, 3], [0, 0, 0, 4]])
def test_swiglu_grouped_equals_per_expert(counts):
    if not grouped_mm_supported(torch.device("cpu"), torch.float32):
        pytest.skip("torch.nn.functional.grouped_mm does not run on this CPU build")
    loop, grouped = _swiglu(), _swiglu(grouped=True)
    assert grouped.uses_grouped_mm(_x(4)) and not loop.uses_grouped_mm(_x(4))
    for a, b in zip(_run(loop, counts), _run(grouped, counts)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_swiglu_offloaded_equals_resident():
    resident, offloaded = _swiglu(), _swiglu()
    offloaded.set_offloaded(True, torch.device("cpu"))
    counts = [3, 0, 5, 2]
    for a, b in zip(_run(resident, counts), _run(offloaded, counts)):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else all(torch.equal(u, v) for u, v in zip(a, b))
    assert offloaded.offload_stats.copies_in == 6  # 3 experts with rows, forward and backward


def test_swiglu_expert_formula():
    experts = _swiglu(num_local=1)
    rows = _x(5)
    w1, w2 = experts.w1[0], experts.w2[0]
    gate, up = rows @ w1[:, :8], rows @ w1[:, 8:]
    torch.testing.assert_close(experts(rows, [5]), (torch.nn.functional.silu(gate) * up) @ w2)


def test_shared_expert_adds_its_output():
    spec = MoESpec(expert=ExpertSpec("swiglu"), shared=SharedExpertSpec(d_ff=12, gated=True))
    torch.manual_seed(0)
    with_shared = MoELayer(D, 8, E, 2, spec=spec)
    torch.manual_seed(0)
    without = MoELayer(D, 8, E, 2, spec=MoESpec(expert=ExpertSpec("swiglu")))
    without.load_state_dict({k: v for k, v in with_shared.state_dict().items() if not k.startswith("shared.")})
    x = _x()
    torch.testing.assert_close(with_shared(x), without(x) + with_shared.shared(x))
    assert not any(getattr(p, "lina_expert", False) for p in with_shared.shared.parameters())


def test_invalid_specs_are_named():
    with pytest.raises(ValueError, match="n_group=3 must divide"):
        RouterSpec(n_group=3).validate(8, 2)
    with pytest.raises(ValueError, match="top_k=4 exceeds"):
        RouterSpec(n_group=4, topk_group=1).validate(8, 4)
    with pytest.raises(ValueError, match="needs correction_bias"):
        RouterSpec(bias_update_rate=0.1).validate(8, 2)
    with pytest.raises(ValueError, match="activation 'relu'"):
        ExpertSpec("relu").validate()

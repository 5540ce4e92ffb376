"""Expert parallelism over 4 Gloo ranks gives the outputs and gradients of one process."""

import pytest
import torch

from lina.moe.comm_context import ExpertComm
from lina.moe.layer import MoELayer
from lina.testing.multiproc import run_ranks

pytestmark = pytest.mark.slow  # multi-process

D, F, E, T = 16, 32, 8, 24
ATOL = 1e-5  # same arithmetic per row; only matmul blocking over different row counts differs


def _inputs(rank: int, positive: bool = False) -> torch.Tensor:
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(100 + rank))
    return x.abs() + 0.5 if positive else x


def _make(top_k: int, dropless: bool, comm=None) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(D, F, E, top_k=top_k, capacity_factor=1.0, dropless=dropless, balance_loss_weight=0.01, comm=comm)


def _ep_rank(rank, world, top_k, dropless, force_expert):
    import torch.distributed as dist

    layer = _make(top_k, dropless, ExpertComm(group=dist.group.WORLD))
    if force_expert is not None:  # every token picks the same experts: other ranks get nothing
        with torch.no_grad():
            layer.router.gate.weight.zero_()
            layer.router.gate.weight[force_expert] = 1.0
    x = _inputs(rank, force_expert is not None).requires_grad_()
    y = layer(x)
    (y.pow(2).sum() + layer.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return {"y": y.detach(), "dx": x.grad, "grads": grads, "experts": layer.experts.global_ids}


def _reference(world, top_k, dropless, force_expert):
    layer = _make(top_k, dropless)
    if force_expert is not None:
        with torch.no_grad():
            layer.router.gate.weight.zero_()
            layer.router.gate.weight[force_expert] = 1.0
    outs = []
    for rank in range(world):
        x = _inputs(rank, force_expert is not None).requires_grad_()
        y = layer(x)
        (y.pow(2).sum() + layer.aux_loss).backward()
        outs.append((y.detach(), x.grad))
    return layer, outs


@pytest.mark.parametrize("top_k,dropless", [(1, True), (2, True), (1, False), (2, False)])
def test_ep4_matches_single_process(top_k, dropless):
    world = 4
    results = run_ranks(_ep_rank, world, top_k, dropless, None)
    ref_layer, ref = _reference(world, top_k, dropless, None)
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["y"], ref[rank][0], atol=ATOL, rtol=0)
        torch.testing.assert_close(res["dx"], ref[rank][1], atol=ATOL, rtol=0)
    # Router (replicated) gradients: the sum over ranks equals the reference's accumulated grad.
    router_sum = sum(r["grads"]["router.gate.weight"] for r in results)
    torch.testing.assert_close(router_sum, ref_layer.router.gate.weight.grad, atol=ATOL, rtol=0)
    # Expert gradients: each rank holds its experts' full gradient (from every rank's tokens).
    for res in results:
        ids = res["experts"]
        torch.testing.assert_close(res["grads"]["experts.w1"], ref_layer.experts.w1.grad[ids], atol=ATOL, rtol=0)
        torch.testing.assert_close(res["grads"]["experts.w2"], ref_layer.experts.w2.grad[ids], atol=ATOL, rtol=0)


def test_ranks_and_experts_with_zero_tokens_complete():
    """All tokens pick experts 0 and 1 (both on rank 0): ranks 1-3 receive nothing, and experts
    2-7 compute nothing, yet forward and backward finish and match one process."""
    world = 4
    results = run_ranks(_ep_rank, world, 2, True, [0, 1])
    _, ref = _reference(world, 2, True, [0, 1])
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["y"], ref[rank][0], atol=ATOL, rtol=0)
    assert float(results[3]["grads"]["experts.w1"].abs().sum()) == 0.0
    assert float(results[0]["grads"]["experts.w1"].abs().sum()) > 0.0

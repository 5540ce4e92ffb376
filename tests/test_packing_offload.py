"""--max-expert-memory: offloaded experts keep their weights in host memory and are brought in (a
counted copy) before their FFN runs and again for its backward; results do not change.

On CPU host and device are the same memory, so what is tested is the code path and its accounting;
the GPU path (pinned host memory, ``.to(device, non_blocking=True)``) could not run here."""

import torch

from lina.moe.experts import LocalExperts, local_expert_ids
from lina.moe.layer import MoELayer

D, F_, E = 8, 16, 3


def _pair() -> tuple[LocalExperts, LocalExperts]:
    torch.manual_seed(0)
    resident = LocalExperts(E, D, F_, [0, 1, 2])
    offloaded = LocalExperts.from_tensors([0, 1, 2], *(w.detach() for w in resident.weights()))
    offloaded.set_offloaded(True, torch.device("cpu"))
    return resident, offloaded


def test_offloaded_experts_compute_the_same_and_are_counted():
    resident, offloaded = _pair()
    assert not resident.offloaded and offloaded.offloaded
    counts = [4, 0, 3]  # expert 1 gets no rows: it is not brought in
    x = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for experts in (resident, offloaded):
        xi = x.clone().requires_grad_()
        y = experts(xi, counts)
        (y.pow(2).sum()).backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [w.grad for w in experts.weights()])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=0)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    assert float(grads[1][1][1].abs().sum()) == 0.0  # the idle expert's w1 got no gradient
    stats = offloaded.offload_stats
    per_expert = sum(w[0].numel() * w.element_size() for w in offloaded.weights())
    assert stats.copies_in == 4  # experts 0 and 2, forward and backward
    assert stats.bytes_in == 4 * per_expert
    assert resident.offload_stats.copies_in == 0


def test_offloaded_weights_stay_the_parameters_the_optimizer_updates():
    _, offloaded = _pair()
    before = [w.detach().clone() for w in offloaded.weights()]
    opt = torch.optim.SGD(offloaded.parameters(), lr=0.1)
    offloaded(torch.ones(3, D), [1, 1, 1]).sum().backward()
    opt.step()
    assert all(not torch.equal(a, w) for a, w in zip(before, offloaded.weights()))
    weights = sum(w.numel() * 4 for w in offloaded.weights())
    assert offloaded.weight_bytes() == weights and offloaded.training_bytes() == 4 * weights  # + grads, 2 moments


def test_moe_layer_with_offloaded_experts_matches_resident():
    layers = []
    for offload in (False, True):
        torch.manual_seed(0)
        layer = MoELayer(D, F_, 4, top_k=2)
        layer.experts.set_offloaded(offload, torch.device("cpu"))
        layers.append(layer)
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(2))
    ys = []
    for layer in layers:
        y = layer(x)
        (y.pow(2).sum() + layer.aux_loss).backward()
        ys.append(y.detach())
    torch.testing.assert_close(ys[1], ys[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(layers[1].experts.w1.grad, layers[0].experts.w1.grad, atol=1e-6, rtol=0)
    used = int((layers[1].last_routing.expert_ids.reshape(-1).bincount(minlength=4) > 0).sum())
    assert layers[1].experts.offload_stats.copies_in == 2 * used


def test_local_expert_ids():
    assert local_expert_ids(0, 4, 4) == [0]
    assert local_expert_ids(3, 2, 4) == [2, 3]
    assert local_expert_ids(2, 1, 4) == [0, 1, 2, 3]

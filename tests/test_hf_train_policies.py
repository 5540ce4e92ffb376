"""Ten AdamW steps of a swapped transformers model on 4 Gloo ranks (EP 2 x DP 2) under every
gradient-sync policy give the losses of the unswapped model trained in one process on the four
ranks' batches together.

Tolerance: every loss within 1e-5 relative of the one-process loss. The sums differ in order
(all-to-all micro-ops, allreduce chunks, per-expert row groups), a few ulps per step, which ten
Adam steps do not amplify beyond that at this scale.
"""

import pytest
import torch

pytest.importorskip("transformers")

from hf_helpers import FAMILIES, batch  # noqa: E402
from lina.testing.multiproc import run_ranks  # noqa: E402

WORLD, EP, STEPS, LR = 4, 2, 10, 1e-2
POLICIES = ("sequential", "ddp-overlap", "tutel", "lina")
REL_TOL = 1e-5


def _rank_batch(step, rank):
    """Each rank's fixed batch (the same every step, so the loss falls as the model fits it)."""
    return batch(1000 + rank, b=2, s=12)


def _train(rank, world):
    from lina.comm.groups import build_groups
    from lina.hf.swap import expert_parallel
    from lina.hf.tiny import tiny_model

    groups = build_groups(EP, 60.0)
    out = {}
    for family in FAMILIES:
        for policy in POLICIES:
            model = tiny_model(family, seed=6).train()
            ep = expert_parallel(model, groups, policy=policy, pipeline_chunks=2, chunk_mb=0.001)
            opt = torch.optim.AdamW(model.parameters(), lr=LR)
            losses = []
            for step in range(STEPS):
                ids, labels = _rank_batch(step, rank)
                ep.begin_step()
                loss = model(ids, labels=labels).loss
                loss.backward()
                ep.finish()
                opt.step()
                opt.zero_grad(set_to_none=True)
                mean = loss.detach().clone()
                torch.distributed.all_reduce(mean)
                losses.append(float(mean) / world)
            ep.close()
            out[family, policy] = losses
    return out


def _reference(family):
    from lina.hf.tiny import tiny_model

    model = tiny_model(family, seed=6).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        parts = [_rank_batch(step, r) for r in range(WORLD)]
        ids, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        loss = model(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.slow
def test_every_policy_trains_the_swapped_model_like_one_process():
    results = run_ranks(_train, WORLD, timeout_s=300)[0]
    for family in FAMILIES:
        ref = _reference(family)
        assert ref[-1] < ref[0]
        for policy in POLICIES:
            got = results[family, policy]
            worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
            print(family, policy, f"worst relative loss difference {worst:.2e}")
            assert worst <= REL_TOL, (family, policy, worst, got, ref)

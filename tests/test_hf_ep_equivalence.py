"""A swapped transformers model over 4 Gloo ranks (EP 4, and EP 2 x DP 2; plain and pipelined
exchanges) gives every rank the logits and input gradients of the original model on that rank's
batch, and after the gradient-sync policy the mean parameter gradients of the original over all
four batches."""

import pytest
import torch

pytest.importorskip("transformers")

from hf_helpers import FAMILIES, assert_grads_match, batch, hf_grads, lina_grads, loss_and_input_grad  # noqa: E402
from lina.testing.multiproc import run_ranks  # noqa: E402

WORLD = 4
ATOL = 1e-5
MODES = {  # name -> (EP size, policy); tutel and lina pipeline the exchange in 2 micro-ops
    "ep4": (4, "sequential"),
    "ep2xdp2": (2, "ddp-overlap"),
    "ep4-pipelined": (4, "tutel"),
    "ep2xdp2-pipelined": (2, "lina"),
}


def _rank(rank, world):
    from lina.comm.groups import build_group_set
    from lina.hf.swap import expert_parallel
    from lina.hf.tiny import tiny_model

    group_set = build_group_set([4, 2], 60.0)
    out = {}
    for family in FAMILIES:
        for mode, (ep, policy) in MODES.items():
            model = tiny_model(family, seed=1)
            handle = expert_parallel(model, group_set[ep], policy=policy, pipeline_chunks=2, chunk_mb=0.001)
            assert handle.comm.pipeline_chunks == (2 if mode.endswith("pipelined") else 1)
            ids, labels = batch(100 + rank)
            handle.begin_step()
            logits, _, dx = loss_and_input_grad(model, ids, labels)
            handle.finish()
            handle.close()
            out[family, mode] = {
                "logits": logits,
                "dx": dx,
                "grads": lina_grads(model),
                "experts": handle.layers[0].experts.global_ids,
            }
    return out


@pytest.mark.slow
def test_swapped_models_over_four_ranks_match_one_process():
    from lina.hf.tiny import tiny_model

    results = run_ranks(_rank, WORLD, timeout_s=240)
    for family in FAMILIES:
        hf = tiny_model(family, seed=1)
        ref = []
        for r in range(WORLD):
            ref.append(loss_and_input_grad(hf, *batch(100 + r)))
        mean_grads = {k: v / WORLD for k, v in hf_grads(hf).items()}
        for mode, (ep, _) in MODES.items():
            for r in range(WORLD):
                res = results[r][family, mode]
                torch.testing.assert_close(res["logits"], ref[r][0], atol=ATOL, rtol=0, msg=f"{family} {mode} rank {r}")
                torch.testing.assert_close(res["dx"], ref[r][2], atol=ATOL, rtol=0, msg=f"{family} {mode} rank {r}")
                per_rank = 8 // ep
                assert res["experts"] == list(range((r % ep) * per_rank, (r % ep + 1) * per_rank))
                assert_grads_match(res["grads"], mean_grads, expert_ids=res["experts"])

"""``lina generate --compute DEVICE``: timings in a device's time, text from the real model.

A device-time mode never produces outputs, so the job first generates for real, recording every
step's routing (each rank's tokens' experts and gate weights at every layer), then replays the
same decode schedule (the same steps, the same tokens per step and rank, the recorded routing) on
the same workers and links with ``lina bench serve``'s replay (:func:`lina.infer.step_replay.replay_step`):
the expert FFNs are charged the device's time x dilation, the placement policy plans again as it
did (a fresh one, with the same estimator learning the same way), and each step's time is its
slowest rank's. Only the MoE layers are replayed (dispatch, experts, combine); attention and the
head are not modelled, as in ``lina bench serve``. Times are reported in real-cluster units
(measured / dilation), the measured ones beside them.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch
import torch.distributed as dist

from lina.infer.engine import InferenceEngine
from lina.infer.policies import make_serving_policy
from lina.infer.step_replay import device_time_expert, replay_step
from lina.infer.store import ExpertStore
from lina.placement.estimators import OnlinePathEstimator
from lina.serve.estimators import online_base
from lina.serve.latency import latency_percentiles
from lina.serve.online import EstimatorWatch


def timing_note(plan: dict) -> str:
    """The line every device-time summary carries."""
    return f"timings: {plan['compute']} device time at dilation {plan['dilation']:g}; text from the real model"


def replay_schedule(
    plan: dict,
    store: ExpertStore,
    top_k: int,
    d_model: int,
    recorded: list[tuple[torch.Tensor, torch.Tensor]],
    estimator_for: Callable,
    model,
    requests,
) -> list[float]:
    """Replay this rank's ``recorded`` steps (``(expert_ids LongTensor[T, L, k], weights
    FloatTensor[T, L, k])`` each) in device time; a collective, every rank calls it with its own.

    Returns:
        this rank's measured (dilated) latency of each step, seconds.
    """

    rank, world = dist.get_rank(), dist.get_world_size()
    estimator = estimator_for(plan, model, requests)  # as the real run started
    base = online_base(estimator) if estimator is not None else None
    learner = EstimatorWatch(estimator, base) if isinstance(base, OnlinePathEstimator) else None
    policy = make_serving_policy(plan["placement"], store.num_experts, world, top_k, store.num_layers, estimator)
    engine = InferenceEngine(
        store, top_k, dist.group.WORLD, policy, expert_fn=device_time_expert(plan["compute"], plan["dilation"])
    )
    gen = torch.Generator().manual_seed(plan["seed"] + rank)
    out = []
    for ids, weights in recorded:
        h0 = torch.randn(ids.shape[0], d_model, generator=gen)
        out.append(replay_step(engine, ids, weights, h0).latency_s)
        if learner is not None:  # the estimator learns as it did, so the policy plans as it did
            learner.observe(ids)
    return out


def device_timings(rows: list[dict], summary: dict, steps_s: list[float], plan: dict) -> tuple[list[dict], dict]:
    """Requests' and the summary's timings from the replayed steps ``steps_s`` (dilated seconds,
    the slowest rank's, step 1 = the prefill), in real-cluster units; the measured ones move under
    ``measured``. Every request starts at the prefill, and its i-th token comes with step i."""
    dilation = float(plan["dilation"])
    real = [s / dilation for s in steps_s]
    out_rows = []
    for row in rows:
        n = len(row["tokens"])
        measured = {"ttft_s": row["ttft_s"], "token_latencies_s": row["token_latencies_s"]}
        out_rows.append(row | {"ttft_s": real[0], "token_latencies_s": real[1:n], "measured": measured})
    latencies = [x for r in out_rows for x in r["token_latencies_s"]]
    wall = sum(real)
    keys = ("wall_s", "tokens_per_s", "ttft_s_p50", "token_latency_s")
    device = {
        "wall_s": wall,
        "tokens_per_s": summary["generated_tokens"] / wall if wall > 0 else None,
        "ttft_s_p50": statistics.median(r["ttft_s"] for r in out_rows),
        "token_latency_s": latency_percentiles(latencies),
    }
    return out_rows, summary | device | {
        "measured": {k: summary[k] for k in keys},
        "timings": timing_note(plan),
        "compute": plan["compute"],
        "dilation": dilation,
        "device_time_scope": "MoE layers (dispatch, experts, combine) replayed; attention and head not modelled",
    }

"""What each worker of ``lina generate`` runs: load the model, take its share of the requests
(every N-th, starting at its rank), serve them through the expert-parallel engine, and hand every
result to rank 0. With a device (``compute``), the same decode schedule is then replayed in
device time (:mod:`lina.serve.device_replay`). :func:`run` for local processes,
``python -m lina.serve.worker PLAN.json`` on the emulated cluster (rank 0 writes ``plan["result"]``)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lina.cluster.teardown import leave_distributed
from lina.infer.engine import InferenceEngine
from lina.infer.model_adapter import load_trained_model
from lina.infer.policies import make_serving_policy
from lina.placement.estimators import OnlinePathEstimator
from lina.serve.cached_gpt import CachedGPT
from lina.serve.estimators import ESTIMATOR_PLACEMENTS, fit_on_prompts, online_base, serving_estimator
from lina.serve.generator import generate
from lina.serve.latency import latency_percentiles
from lina.serve.online import EstimatorWatch, hit_rate_report
from lina.serve.requests import decode, encode, read_requests
from lina.train.worker import init_distributed


def fit_estimator(model, requests, placement: str = "lina"):
    """The estimator ``placement`` plans with, fitted on the prompts' own routing (None where it
    uses none). ``model``: a :class:`MoEGPT` or an :class:`HFCausalLM`."""
    if placement not in ESTIMATOR_PLACEMENTS:
        return None
    return fit_on_prompts(model, [torch.tensor([r.tokens]) for r in requests], placement)


def load_served(plan: dict):
    """(served model, the model record_routing runs, encode, decode, context) of ``plan``'s
    ``model`` (a lina run) or ``hf_model`` (a Hugging Face checkpoint, every expert here)."""
    if plan.get("hf_model"):
        from lina.hf.checkpoint import load_pretrained
        from lina.hf.lm import HFCausalLM
        from lina.serve.cached_hf import CachedHF, text_codec

        handle = load_pretrained(plan["hf_model"])
        served = CachedHF(handle)
        encode_text, decode_text = text_codec(plan["hf_model"])
        return served, HFCausalLM(handle, served.context).eval(), encode_text, decode_text, served.context
    model = load_trained_model(plan["model"])
    return CachedGPT(model), model, encode, decode, model.cfg.seq_len


def estimator_for(plan: dict, model, requests):
    """The estimator ``plan["placement"]`` plans with, from ``plan["estimator"]`` (a file) or fitted
    on the prompts, online with ``plan["online_decay"]`` (None for placements without one)."""
    prompts = [torch.tensor([r.tokens]) for r in requests]
    return serving_estimator(plan["placement"], model, prompts, plan.get("estimator"), plan.get("online_decay"))


def run(plan: dict) -> dict | None:
    """``plan``: model or hf_model, prompts, max_new_tokens, placement, temperature, seed, timeout_s;
    optional estimator (a file), online_decay, compute and dilation (device-time replay), world
    (workers on this machine) and result (where rank 0 writes its result as JSON)."""
    init_distributed(plan["timeout_s"], plan.get("world"))
    try:
        result = _serve(plan)
        if result is not None and plan.get("result"):
            Path(plan["result"]).write_text(json.dumps(result))
        return result
    finally:
        leave_distributed()


def _serve(plan: dict) -> dict | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    served, model, encode_text, decode_text, context = load_served(plan)
    requests = read_requests(plan["prompts"], plan["max_new_tokens"], context, encode_text)
    mine = requests[rank::world]
    estimator = estimator_for(plan, model, requests)
    base = online_base(estimator) if estimator is not None else None
    watch = (
        EstimatorWatch(estimator, base if isinstance(base, OnlinePathEstimator) else None)
        if estimator is not None
        else None
    )
    store = served.store
    top_k = model.cfg.top_k
    policy = make_serving_policy(plan["placement"], store.num_experts, world, top_k, store.num_layers, estimator)
    engine = InferenceEngine(store, top_k, dist.group.WORLD, policy)
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
    replaying = plan.get("compute", "real") != "real"

    def on_step(ids: torch.Tensor, weights: torch.Tensor) -> None:
        if watch is not None:
            watch.observe(ids)
        if replaying:
            recorded.append((ids.clone(), weights.detach().float().clone()))

    def progress(step: int, active: int) -> None:
        if rank == 0 and (step == 1 or step % 10 == 0):
            print(
                f"step {step}: {'prefill done' if step == 1 else 'decoding'}, rank 0 has {active} request(s) left",
                flush=True,
            )

    start = time.perf_counter()
    generations, stats = generate(
        served, engine, mine, plan["temperature"], plan["seed"], progress, decode_text, on_step
    )
    wall = time.perf_counter() - start
    device_steps = None
    if replaying:
        from lina.serve.device_replay import replay_schedule

        if rank == 0:
            print(f"replaying {len(recorded)} step(s) in {plan['compute']} device time", flush=True)
        device_steps = replay_schedule(plan, store, top_k, model.cfg.d_model, recorded, estimator_for, model, requests)
    gathered: list = [None] * world
    dist.all_gather_object(
        gathered,
        {
            "generations": [g.to_dict() | {"index": g.index} for g in generations],
            "steps": stats.steps,
            "step_latencies_s": stats.step_latencies_s,
            "estimator": None
            if watch is None
            else {"hits": watch.hits, "scored": watch.scored, "updates": watch.updates},
            "device_steps_s": device_steps,
        },
    )
    if rank != 0:
        return None
    rows = sorted((g for part in gathered for g in part["generations"]), key=lambda g: g["index"])
    summary = summarize(rows, wall, plan, world)
    summary["placement_sources"] = policy.source_report(store.num_layers)
    if policy.arm_report() is not None:  # lina-auto: which arm served each class of batch
        summary["placement_arms"] = policy.arm_report()
    if watch is not None:
        summary["estimator"] = hit_rate_report([part["estimator"] for part in gathered]) | {
            "source": plan.get("estimator") or "fitted on the prompts",
            "online_decay": plan.get("online_decay"),
            "top_k": top_k,
        }
    if replaying:
        from lina.serve.device_replay import device_timings

        # a step ends when its slowest rank is done
        steps_s = [max(part["device_steps_s"][i] for part in gathered) for i in range(stats.steps)]
        rows, summary = device_timings(rows, summary, steps_s, plan)
    return {"generations": rows, "summary": summary}


def summarize(rows: list[dict], wall_s: float, plan: dict, world: int) -> dict:
    """Time to first token and per-token latency percentiles over all requests, tokens/s."""
    latencies = [x for r in rows for x in r["token_latencies_s"]]
    tokens = sum(len(r["tokens"]) for r in rows)
    return {
        "requests": len(rows),
        "workers": world,
        "placement": plan["placement"],
        "generated_tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "ttft_s_p50": statistics.median(r["ttft_s"] for r in rows),
        "token_latency_s": latency_percentiles(latencies),
    }


if __name__ == "__main__":
    from lina.cluster.failures import run_recorded

    run_recorded(run, json.loads(Path(sys.argv[1]).read_text()))

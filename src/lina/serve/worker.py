"""What each worker of ``lina generate`` runs: load the model, take its share of the requests
(every N-th, starting at its rank), serve them through the expert-parallel engine, and hand every
result to rank 0."""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from lina.infer.engine import InferenceEngine
from lina.infer.model_adapter import load_trained_model, record_routing
from lina.infer.policies import make_serving_policy
from lina.placement.estimators import PathEstimator
from lina.serve.cached_gpt import CachedGPT
from lina.serve.generator import generate
from lina.serve.requests import decode, encode, read_requests
from lina.train.worker import init_distributed


def fit_estimator(model, requests, path_len: int = 3) -> PathEstimator:
    """Lina's path estimator fitted on the prompts' own routing (every rank sees every prompt,
    so every rank fits the same one). ``model``: a :class:`MoEGPT` or an :class:`HFCausalLM`."""
    trace = record_routing(model, [torch.tensor([r.tokens]) for r in requests], "prompts")
    return PathEstimator(max(1, min(path_len, len(model.moe_layers()) - 1))).fit(trace)


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


def run(plan: dict) -> dict | None:
    """``plan``: model or hf_model, prompts, max_new_tokens, placement, temperature, seed, timeout_s."""
    init_distributed(plan["timeout_s"])
    try:
        return _serve(plan)
    finally:
        dist.destroy_process_group()


def _serve(plan: dict) -> dict | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    served, model, encode_text, decode_text, context = load_served(plan)
    requests = read_requests(plan["prompts"], plan["max_new_tokens"], context, encode_text)
    mine = requests[rank::world]
    estimator = fit_estimator(model, requests) if plan["placement"] == "lina" else None
    store = served.store
    top_k = model.cfg.top_k
    policy = make_serving_policy(plan["placement"], store.num_experts, world, top_k, store.num_layers, estimator)
    engine = InferenceEngine(store, top_k, dist.group.WORLD, policy)

    def progress(step: int, active: int) -> None:
        if rank == 0 and (step == 1 or step % 10 == 0):
            print(
                f"step {step}: {'prefill done' if step == 1 else 'decoding'}, rank 0 has {active} request(s) left",
                flush=True,
            )

    start = time.perf_counter()
    generations, stats = generate(served, engine, mine, plan["temperature"], plan["seed"], progress, decode_text)
    wall = time.perf_counter() - start
    gathered: list = [None] * world
    dist.all_gather_object(
        gathered,
        {
            "generations": [g.to_dict() | {"index": g.index} for g in generations],
            "steps": stats.steps,
            "step_latencies_s": stats.step_latencies_s,
        },
    )
    if rank != 0:
        return None
    rows = sorted((g for part in gathered for g in part["generations"]), key=lambda g: g["index"])
    summary = summarize(rows, wall, plan, world)
    summary["placement_sources"] = policy.source_report(store.num_layers)
    return {"generations": rows, "summary": summary}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


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
        "token_latency_s": {"p50": _pct(latencies, 0.5), "p95": _pct(latencies, 0.95), "p99": _pct(latencies, 0.99)},
    }

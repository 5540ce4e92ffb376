"""Built-in inference scenarios and the ``lina sim`` inference path.

Testbed inference (the paper: Transformer-XL and BERT-Large, top-1, 4-16 experts, on the same
4x4 A100 testbed): routing from :func:`lina.sim.routing.drifting_trace` (per-batch skew, fixed
inter-layer affinity); the Lina policy's path estimator (``l = 3``) is fitted on a *different*
trace of the same synthetic model. ``infer-mixtral-gsm8k`` replays the real Mixtral-8x7B routing
in ``../shared/data`` (fitted on one GSM8K problem, replayed on the other): a small real-world
check, not a benchmark.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

from lina.errors import ConfigError, LinaError
from lina.obs.provenance import provenance
from lina.sim import paper
from lina.sim.infer import INFER_POLICIES, InferResult, InferSpec, simulate_inference
from lina.sim.scenarios import TESTBED_EFFICIENCY, TESTBED_LAYOUT
from lina.sim.spec import DEVICES, ClusterSpec, DeviceSpec, ModelSpec

MIXTRAL_FILE = "mixtral-8x7b-gsm8k-routing.jsonl"
AFFINITY = 0.6
CONCENTRATION = 4.0
PATH_LEN = 3


def default_data_dir() -> Path:
    """``../shared/data`` beside the checkout (where the project's real data lives)."""
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


@dataclass(frozen=True)
class InferScenario:
    name: str
    description: str
    cluster: ClusterSpec
    model: ModelSpec
    device: DeviceSpec
    spec: InferSpec
    trace_kind: str = "drifting"  # or "mixtral"
    policies: tuple[str, ...] = INFER_POLICIES
    seed: int = field(default=0)

    @property
    def gpus(self) -> int:
        return self.cluster.gpus


_INFER_MODELS = {
    "txl": dict(name="transformer-xl-24l", layers=24, d_model=512, d_ff=2048, seq_len=512, vocab=204),
    "bert": dict(name="bert-large-24l", layers=24, d_model=1024, d_ff=4096, seq_len=256, vocab=30522),
}


def testbed_infer(model_key: str, experts: int) -> InferScenario:
    hosts, gpus = TESTBED_LAYOUT[experts]
    kw = _INFER_MODELS[model_key]
    spec = InferSpec(tokens_per_device=2048)
    model = ModelSpec(
        experts=experts, top_k=1, batch_size=spec.tokens_per_device // kw["seq_len"], act_bytes=4, param_bytes=4, **kw
    )
    return InferScenario(
        name=f"infer-testbed-{model_key}-e{experts}",
        description=f"paper testbed inference: {kw['name']} top-1, {experts} experts on {hosts}x{gpus} A100, "
        "drifting skewed routing",
        cluster=ClusterSpec(hosts=hosts, gpus_per_host=gpus, link_gbps=100.0),
        model=model,
        device=replace(DEVICES["a100-40gb-tf32"], efficiency=TESTBED_EFFICIENCY),
        spec=spec,
        seed=experts,
    )


def mixtral() -> InferScenario:
    model = ModelSpec(
        name="mixtral-8x7b",
        layers=32,
        d_model=4096,
        d_ff=14336,
        experts=8,
        top_k=2,
        seq_len=1,
        batch_size=2,
        vocab=32000,
    )
    return InferScenario(
        name="infer-mixtral-gsm8k",
        description="real Mixtral-8x7B GSM8K routing (../shared/data), 8 experts on 2x4 H200, 100 "
        "Gb/s; small decode check",
        cluster=ClusterSpec(hosts=2, gpus_per_host=4, link_gbps=100.0),
        model=model,
        device=DEVICES["h200-sxm-bf16"],
        spec=InferSpec(tokens_per_device=2, batches=6, warmup_batches=1),
        trace_kind="mixtral",
    )


INFER_BUILTIN = {
    f"infer-testbed-{m}-e{e}": (lambda m=m, e=e: testbed_infer(m, e)) for m in _INFER_MODELS for e in (4, 8, 16)
}
INFER_BUILTIN["infer-mixtral-gsm8k"] = mixtral


def is_inference(name: str | None) -> bool:
    return bool(name) and name in INFER_BUILTIN


def get(name: str) -> InferScenario:
    if name not in INFER_BUILTIN:
        raise ConfigError("--scenario", f"unknown inference scenario {name!r}", "run `lina sim --list`")
    return INFER_BUILTIN[name]()


def listing() -> list[tuple[str, str, str]]:
    return [(name, str(make().gpus), make().description) for name, make in INFER_BUILTIN.items()]


def _traces(sc: InferScenario, routing: str | None):
    """(trace to replay, trace to fit the estimator on)."""
    from lina.data.routing_trace import load_trace
    from lina.sim.routing import drifting_trace

    n_tok = sc.gpus * sc.spec.tokens_per_device
    if sc.trace_kind == "drifting" and routing is None:
        batches = sc.spec.warmup_batches + sc.spec.batches
        common = dict(
            num_layers=sc.model.moe_layers,
            num_experts=sc.model.experts,
            top_k=sc.model.top_k,
            affinity=AFFINITY,
            concentration=CONCENTRATION,
            model_seed=sc.seed,
        )
        replay = drifting_trace(batches, n_tok, batch_seed=1000 + sc.seed, **common)
        fit = drifting_trace(batches, n_tok, batch_seed=2000 + sc.seed, **common)
        return replay, fit
    path = Path(routing) if routing else default_data_dir() / MIXTRAL_FILE
    if not path.is_file():
        raise LinaError(
            f"routing trace {path} not found (the Mixtral GSM8K routing lives in ../shared/data beside the checkout; "
            "pass --routing FILE)"
        )
    trace = load_trace(path)
    fit, replay = trace.split(0.5, by="seq")
    return replay, fit


def run_inference(sc: InferScenario, routing: str | None = None, progress=None) -> dict[str, InferResult]:
    """Fit the path estimator on one trace and replay the other under every policy."""
    from lina.placement.estimators import PathEstimator

    replay, fit = _traces(sc, routing)
    model = sc.model
    if replay.num_layers != model.moe_layers or replay.num_experts != model.experts:
        model = replace(model, layers=replay.num_layers, experts=replay.num_experts, top_k=replay.top_k)
    estimator = PathEstimator(path_len=PATH_LEN).fit(fit)
    spec = sc.spec
    fits = replay.num_tokens // (sc.gpus * spec.tokens_per_device)
    if fits < spec.warmup_batches + spec.batches:
        if fits < 2:
            raise ConfigError("tokens_per_device", f"the trace holds {fits} batch(es)", "use fewer tokens per device")
        spec = replace(
            spec, warmup_batches=min(spec.warmup_batches, fits // 4), batches=fits - min(spec.warmup_batches, fits // 4)
        )
    return simulate_inference(
        sc.cluster, model, _profile(sc, model), spec, replay, estimator, sc.policies, sc.device.mem_gb, progress
    )


def _profile(sc: InferScenario, model: ModelSpec):
    from lina.sim.compute import ComputeProfile

    return ComputeProfile.from_device(sc.device, model)


def infer_table(sc: InferScenario, results: dict[str, InferResult]) -> str:
    lines = [
        f"{sc.name}: {sc.description}",
        f"  {sc.cluster.describe()}; {sc.model.describe().split(',')[0]}; {sc.spec.tokens_per_device} "
        "tokens/device per batch",
        f"  {'policy':<9}{'median ms':>11}{'p95 ms':>9}{'x median':>10}{'x p95':>8}"
        f"{'a2a p95/layer':>15}{'re-plans':>10}",
    ]
    for name, r in results.items():
        sm = f"{r.speedup_median:.2f}x" if r.speedup_median else "-"
        sp = f"{r.speedup_p95:.2f}x" if r.speedup_p95 else "-"
        rp = f"{r.replans}/{r.checked}" if r.checked else "-"
        lines.append(
            f"  {name:<9}{r.median_s * 1e3:>11.2f}{r.p95_s * 1e3:>9.2f}{sm:>10}{sp:>8}"
            f"{r.a2a_p95_s * 1e3:>14.2f}ms{rp:>10}"
        )
    return "\n".join(lines)


def testbed_inference_rows(progress=print, routing: str | None = None) -> list[dict]:
    """Run the testbed inference scenarios; rows of Lina-vs-static (DeepSpeed) speedups beside the paper's."""
    med, p95 = [], []
    for name in INFER_BUILTIN:
        if not name.startswith("infer-testbed-"):
            continue
        sc = get(name)
        progress(f"inference: {name}")
        res = run_inference(sc)
        progress(infer_table(sc, res))
        med.append(res["lina"].speedup_median)
        p95.append(res["lina"].speedup_p95)
    lo, hi = paper.INFER_MEDIAN_SPEEDUP_RANGE
    return [
        {
            "metric": "inference: lina median latency vs static (mean)",
            "ours": f"{statistics.fmean(med):.2f}x",
            "paper": f"{paper.INFER_MEDIAN_SPEEDUP_AVG:.2f}x ({lo:.2f}-{hi:.2f}x)",
        },
        {
            "metric": "inference: lina p95 latency vs static (mean)",
            "ours": f"{statistics.fmean(p95):.2f}x",
            "paper": f"{paper.INFER_P95_SPEEDUP_AVG:.2f}x",
        },
    ]


def run_command(args) -> int:
    """``lina sim --scenario infer-...``: table, optional JSON."""
    import json

    sc = get(args.scenario)
    print(f"simulating {sc.name} ({sc.gpus} GPUs), policies: {', '.join(sc.policies)}", flush=True)
    res = run_inference(
        sc,
        getattr(args, "routing", None),
        progress=lambda r: print(
            f"  {r.policy:<7} {len(r.latencies_s)} batches simulated in {r.sim_wall_s:.2f} s", flush=True
        ),
    )
    print()
    print(infer_table(sc, res))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "scenario": sc.name,
            "gpus": sc.gpus,
            "policies": {k: v.to_dict() for k, v in res.items()},
            "provenance": provenance(),
        }
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return 0

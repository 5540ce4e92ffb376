"""Built-in scenarios: the paper's testbed and larger clusters up to 1024 GPUs.

**The paper's testbed** (LINA.md): 16 A100 40GB in 4 nodes x 4, 100 Gb/s InfiniBand, NVLink
inside a node, experts = GPUs, top-2 training. We spread ``E`` GPUs over as many of the 4 nodes
as possible (2 experts: 2 nodes x 1 GPU; 4: 4 x 1; 8: 4 x 2; 16: 4 x 4), one NIC per node.
Model shapes as we model them: Transformer-XL 24L d=512 ff=2048 (the d_model/d_ff of which the
paper's Table 1 parameter counts follow), GPT-2 12L and BERT2GPT2 12L at GPT-2 small/BERT-base
width (d=768, ff=3072); fp32 activations and gradients (PyTorch 1.10); 8192 tokens per GPU.
Compute runs at ``TESTBED_EFFICIENCY`` of the A100's TF32 peak: chosen by hand, once, so that
the DeepSpeed baseline's all-to-all share lands in the paper's measured range (30-45 %); the
all-to-all share printed for the testbed is therefore the regime we put it in, not an
independent prediction. The speedups are the model's output in that regime.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lina.errors import ConfigError
from lina.sim.scenario import Scenario
from lina.sim.spec import DEVICES, ClusterSpec, ModelSpec, TrainSpec

TESTBED_EFFICIENCY = 0.1
TESTBED_LAYOUT = {2: (2, 1), 4: (4, 1), 8: (4, 2), 16: (4, 4)}

_TESTBED_MODELS = {
    "txl": dict(name="transformer-xl-24l", layers=24, d_model=512, d_ff=2048, seq_len=512, batch_size=16, vocab=204),
    "gpt2": dict(name="gpt2-12l", layers=12, d_model=768, d_ff=3072, seq_len=1024, batch_size=8, vocab=50257),
    "bert2gpt2": dict(
        name="bert2gpt2-12l", layers=12, d_model=768, d_ff=3072, seq_len=512, batch_size=16, vocab=30522 + 50257
    ),
}


def testbed(model_key: str, experts: int) -> Scenario:
    """The paper's testbed with ``experts`` GPUs (2, 4, 8, 16) and one of its three models."""
    if experts not in TESTBED_LAYOUT:
        raise ConfigError(
            "experts", f"the testbed runs 2, 4, 8 or 16 experts, not {experts}", "pick one of 2, 4, 8, 16"
        )
    hosts, gpus = TESTBED_LAYOUT[experts]
    kw = _TESTBED_MODELS[model_key]
    model = ModelSpec(experts=experts, top_k=2, act_bytes=4, grad_bytes=4, param_bytes=4, **kw)
    device = replace(DEVICES["a100-40gb-tf32"], efficiency=TESTBED_EFFICIENCY)
    return Scenario(
        name=f"testbed-{model_key}-e{experts}",
        description=f"paper testbed: {kw['name']}, {experts} experts on {hosts}x{gpus} A100, 100 Gb/s IB",
        cluster=ClusterSpec(hosts=hosts, gpus_per_host=gpus, link_gbps=100.0, nvlink_gbps=2400.0),
        model=model,
        device=device,
        experts_follow_gpus=True,
    )


def _large(
    name: str, description: str, hosts: int, layers: int, experts: int, link_gbps: float = 400.0, nics: int = 8
) -> Scenario:
    """H100 nodes of 8 GPUs; a MoE-GPT of d=2048, ff=8192, top-2, 8192 tokens per GPU, bf16.

    Gradients use the hierarchical allreduce (reduce-scatter in the node, rings across nodes on
    every NIC), as NCCL does at this scale; a flat ring over 1024 GPUs would spend 2046 hop
    latencies per allreduce.
    """
    model = ModelSpec(
        name=f"moe-gpt-{layers}l",
        layers=layers,
        d_model=2048,
        d_ff=8192,
        experts=experts,
        top_k=2,
        seq_len=4096,
        batch_size=2,
        vocab=32000,
        act_bytes=2,
        grad_bytes=2,
        param_bytes=2,
    )
    return Scenario(
        name=name,
        description=description,
        cluster=ClusterSpec(hosts=hosts, gpus_per_host=8, link_gbps=link_gbps, nics_per_host=nics, nvlink_gbps=3600.0),
        model=model,
        device=DEVICES["h100-sxm-bf16"],
        train=TrainSpec(allreduce_algorithm="hierarchical"),
    )


@dataclass(frozen=True)
class Suite:
    """Several scenarios run together and summarised (the paper's testbed is one)."""

    name: str
    description: str
    members: tuple[str, ...]

    @property
    def gpus_label(self) -> str:
        counts = sorted({BUILTIN[m]().gpus for m in self.members})
        return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


BUILTIN = {}
for _key in _TESTBED_MODELS:
    for _e in TESTBED_LAYOUT:
        BUILTIN[f"testbed-{_key}-e{_e}"] = lambda k=_key, e=_e: testbed(k, e)
BUILTIN["dgx-64x8-400g"] = lambda: _large(
    "dgx-64x8-400g", "64 nodes x 8 H100, 8x400 Gb/s NICs per node, 32L MoE-GPT d=2048, 64 experts", 64, 32, 64
)
BUILTIN["dgx-64x8-1nic"] = lambda: _large(
    "dgx-64x8-1nic", "64 nodes x 8 H100, one 400 Gb/s NIC per node, 32L MoE-GPT d=2048, 64 experts", 64, 32, 64, nics=1
)
BUILTIN["dgx-128x8-400g"] = lambda: _large(
    "dgx-128x8-400g", "128 nodes x 8 H100, 8x400 Gb/s NICs per node, 32L MoE-GPT d=2048, 128 experts", 128, 32, 128
)
BUILTIN["scale-1024-64l"] = lambda: _large(
    "scale-1024-64l", "scale benchmark: 1024 H100 (128x8), 64 layers, 1024 experts (one per GPU)", 128, 64, 1024
)

SUITES = {
    "paper-testbed": Suite(
        "paper-testbed",
        "the paper's testbed: 3 models x 2-16 experts on 4x4 A100, 100 Gb/s (summary beside the paper's numbers)",
        tuple(name for name in BUILTIN if name.startswith("testbed-")),
    ),
}


def get(name: str) -> Scenario:
    """A built-in scenario by name (not a suite)."""
    if name not in BUILTIN:
        raise ConfigError("--scenario", f"unknown scenario {name!r}", "run `lina sim --list` to see the built-in ones")
    return BUILTIN[name]()


def listing() -> list[tuple[str, str, str]]:
    """``(name, gpus, description)`` of every suite and scenario, suites first."""
    rows = [(s.name, s.gpus_label, s.description) for s in SUITES.values()]
    for name in BUILTIN:
        sc = get(name)
        rows.append((name, str(sc.gpus), sc.description))
    return rows

"""``lina bench layer | contention | train | infer | serve``: the benchmarks, each with ``--quick``."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "layer": ("lina.bench.layer", "one MoE layer against a dense FFN of the same active FLOPs"),
    "contention": ("lina.bench.contention", "all-to-all slowdown under a concurrent allreduce (emulated hosts)"),
    "train": (
        "lina.bench.train",
        "training step time of ddp-overlap / sequential / tutel / lina on the emulated cluster",
    ),
    "infer": ("lina.bench.infer", "inference latency of static / eplb / lina / oracle placement"),
    "serve": (
        "lina.bench.serve",
        "prefill and decode latency of static / eplb / lina / oracle placement on requests replayed from traces",
    ),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (policies interleaved in one run; medians; regime printed)")
    sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        bp = sub.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(bp)
        bp.set_defaults(func=module.run)

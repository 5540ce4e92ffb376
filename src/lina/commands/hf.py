"""``lina hf make-tiny``: write tiny random checkpoints of the supported Hugging Face families
(built from a config and saved with ``save_pretrained``; nothing is downloaded)."""

from __future__ import annotations

import argparse
from pathlib import Path

FAMILY_NAMES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def register(subparsers) -> None:
    p = subparsers.add_parser("hf", help="Hugging Face checkpoints: make tiny test checkpoints of each family")
    sub = p.add_subparsers(dest="hf_command", metavar="ACTION")
    tiny = sub.add_parser(
        "make-tiny",
        help="write tiny random checkpoints (config.json + model.safetensors)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    tiny.add_argument("--family", choices=FAMILY_NAMES + ("all",), default="all")
    tiny.add_argument("--out", default="runs/hf-tiny", help="folder; each family goes to OUT/FAMILY")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--max-shard-size", default=None, help="e.g. 40KB: write sharded safetensors with an index")
    tiny.set_defaults(func=make_tiny_cmd)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def make_tiny_cmd(args: argparse.Namespace) -> int:
    from lina.hf.tiny import make_tiny

    families = FAMILY_NAMES if args.family == "all" else (args.family,)
    for family in families:
        out = make_tiny(family, Path(args.out) / family, seed=args.seed, max_shard_size=args.max_shard_size)
        print(f"wrote {out} (tiny random {family}, vocabulary 256)")
    return 0

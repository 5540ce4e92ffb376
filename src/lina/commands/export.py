"""``lina export``: a trained model as one plain folder (safetensors + config.json)."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a trained model as one folder: model.safetensors + config.json",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="runs/train", metavar="RUN_DIR", help="the --out folder of a `lina train` run")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write model.safetensors and config.json into")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lina.obs.provenance import provenance
    from lina.train.export import export_model

    files = export_model(args.model, args.out, provenance())
    config = json.loads(files[1].read_text())
    print(f"exported step {config['step']} of {config['source']}: " + ", ".join(str(f) for f in files))
    return 0

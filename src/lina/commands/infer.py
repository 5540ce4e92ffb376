"""``lina infer``: run a trained model on held-out text and record its routing trace."""

from __future__ import annotations

import argparse
from pathlib import Path

from lina.errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "infer",
        help="run a trained model on held-out text; record the routing trace",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", metavar="DIR", help="the --out folder of a `lina train` run")
    p.add_argument(
        "--hf-model",
        metavar="DIR",
        help="a Hugging Face checkpoint folder (config.json + safetensors) instead; needs pip install 'lina[hf]'",
    )
    p.add_argument("--seq-len", type=int, default=64, help="sequence length of --hf-model runs")
    p.add_argument("--record-trace", metavar="FILE.npz", help="write every token's experts at every layer here")
    p.add_argument(
        "--corpus",
        default="",
        help="text file or folder to read held-out text from (default: the stdlib sources' validation split)",
    )
    p.add_argument("--sequences", type=int, default=48, help="held-out sequences to run")
    p.add_argument("--seed", type=int, default=1234)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from lina.data.corpus import load_corpus, sample_batch
    from lina.infer.model_adapter import load_trained_model, record_routing

    if args.sequences < 1:
        raise ConfigError("sequences", f"{args.sequences}", "run at least 1 sequence")
    if (args.model is None) == (args.hf_model is None):
        raise ConfigError(
            "model",
            "give exactly one of --model and --hf-model",
            "pass --model DIR (a lina train run) or --hf-model DIR",
        )
    if args.hf_model is not None:
        from lina.hf.lm import checkpoint_model_fields, load_hf_for_inference

        fields = checkpoint_model_fields(args.hf_model)
        if not 1 <= args.seq_len <= fields["max_positions"]:
            limit = fields["max_positions"]
            raise ConfigError(
                "seq_len",
                f"{args.seq_len} is outside 1..{limit} (the checkpoint's positions)",
                f"use --seq-len <= {limit}",
            )
        model = load_hf_for_inference(args.hf_model, args.seq_len)
    else:
        model = load_trained_model(args.model)
    corpus = load_corpus(args.corpus, 3.0)
    if args.hf_model is not None:
        from lina.hf.tokens import corpus_for

        corpus = corpus_for(args.hf_model, corpus, fields["vocab_size"])
    batches, losses = [], []
    per_batch = 8
    for i in range((args.sequences + per_batch - 1) // per_batch):
        x, y = sample_batch(corpus.val, per_batch, model.cfg.seq_len, args.seed, i, 0)
        with torch.no_grad():
            logits = model(x)
        losses.append(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))))
        batches.append(x)
    name = f"Hugging Face checkpoint {args.hf_model}" if args.hf_model else f"lina MoE GPT from {args.model}"
    trace = record_routing(model, batches, f"{name}, held-out {corpus.source}")
    counts = trace.slot_counts().double()
    skew = (counts.max(1).values / counts.min(1).values.clamp_min(1)).tolist()
    print(f"ran {trace.num_tokens} held-out tokens: loss {sum(losses) / len(losses):.4f}")
    print("per-layer expert skew (most / least chosen token-slots): " + " ".join(f"{s:.2f}" for s in skew))
    if args.record_trace:
        path = trace.save(Path(args.record_trace))
        print(f"wrote routing trace {path} ({trace.num_tokens} tokens x {trace.num_layers} layers x top-{trace.top_k})")
    return 0

"""``lina train``: train the MoE GPT with expert and data parallelism."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lina.cluster.presets import PRESETS
from lina.config import TrainConfig, load_toml, merge
from lina.errors import raise_all
from lina.policy import TRAIN_POLICIES

OPTION_FIELDS = {
    "workers": "workers",
    "steps": "steps",
    "experts": "model.experts",
    "top_k": "model.top_k",
    "policy": "policy",
    "out": "output.out",
    "seed": "seed",
    "batch_size": "batch_size",
    "ep_size": "ep_size",
    "corpus": "corpus",
    "chunk_mb": "comm.chunk_mb",
    "trace": "output.trace",
    "capacity_factor": "model.capacity_factor",
    "emulate": "emulation.emulate",
    "lr": "lr",
    "pipeline_chunks": "comm.pipeline_chunks",
    "credit": "comm.credit",
    "packing": "packing.mode",
    "packing_first_step": "packing.first_step",
    "packing_every": "packing.every",
    "max_expert_memory": "packing.max_expert_memory_mb",
    "hf_model": "model.hf_model",
    "compute": "emulation.compute",
    "dilation": "emulation.dilation",
    "routing_trace": "emulation.routing_trace",
}


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the MoE GPT (spawns local workers; also runs under torchrun)")
    p.add_argument("--config", metavar="FILE.toml", help="settings file; options given here override it")
    p.add_argument(
        "--workers", type=int, help="local worker processes (default 4; under torchrun: its --nproc-per-node)"
    )
    p.add_argument("--steps", type=int, help="training steps (default 200)")
    p.add_argument("--experts", type=int, help="experts per MoE layer (default 4)")
    p.add_argument("--top-k", type=int, help="experts per token (default 2)")
    p.add_argument("--capacity-factor", type=float, help="expert capacity factor; implies capacity-limited routing")
    trainable = ", ".join(n for n, pol in TRAIN_POLICIES.items() if pol.trainable)
    p.add_argument(
        "--policy",
        "--schedule",
        dest="policy",
        action=_PolicyOption,
        help=f"training policy: {trainable}, or module:NAME for one of your own (default lina; "
        "--schedule is its old name)",
    )
    p.add_argument("--ep-size", type=int, help="expert-parallel group size (default: all workers)")
    p.add_argument("--batch-size", type=int, help="sequences per worker per step (default 8)")
    p.add_argument("--lr", type=float, help="learning rate (default 3e-3)")
    p.add_argument("--chunk-mb", help="lina allreduce micro-op size in MB, or 'auto'")
    p.add_argument("--pipeline-chunks", type=int, help="all-to-all micro-ops per MoE layer for tutel/lina")
    p.add_argument("--credit", type=int, help="lina: allreduce micro-ops in flight at once (default 1)")
    p.add_argument(
        "--packing",
        help="expert packing: off (the --ep-size layout), auto (double experts per rank while an FFN "
        "micro-op is shorter than an all-to-all micro-op), N (N experts per rank, EP size = experts / N) or N@STEP "
        "(switch to N experts per rank at STEP) (default off)",
    )
    p.add_argument("--packing-first-step", type=int, help="auto packing: first decision before this step (default 10)")
    p.add_argument("--packing-every", type=int, help="auto packing: re-check every this many steps (default 4)")
    p.add_argument(
        "--max-expert-memory",
        type=float,
        metavar="MB",
        help="device memory for expert weights, gradients and AdamW "
        "state per rank; MoE layers beyond it keep their experts in host memory and bring each in when it computes "
        "(default 0: unlimited)",
    )
    p.add_argument(
        "--compute",
        help="real (default: compute) or a device (a100, h100, h200, or a device .toml): every compute "
        "op then takes that device's time instead of being computed; needs --routing-trace",
    )
    p.add_argument(
        "--dilation",
        type=float,
        help="time dilation K with --compute DEVICE: device times x K, emulated link "
        "rates / K (give the real cluster's link in --emulate) (default 1)",
    )
    p.add_argument(
        "--routing-trace",
        metavar="FILE",
        help="routing of a device-time run: a .npz of lina infer --record-trace, or a vLLM routing .jsonl",
    )
    p.add_argument("--corpus", help="text file or folder (default: the Python standard library's sources)")
    p.add_argument("--out", help="output folder (default runs/train)")
    p.add_argument("--trace", metavar="DIR", help="write the timeline: Chrome trace, breakdown, plot")
    p.add_argument(
        "--emulate",
        help="emulated cluster, e.g. hosts=4,link=200mbit,intra=10gbit (intra: the link between "
        "workers of one host; default off, free loopback) (default none: loopback)",
    )
    p.add_argument(
        "--cluster",
        choices=sorted(PRESETS),
        help="emulate a named real cluster: paper = 4 hosts x 4 A100, 100 Gb/s between hosts, NVLink "
        "inside; compute a100 unless --compute says otherwise, as many workers per host as this machine "
        "holds, and a time dilation that keeps every emulated rate within what tc shapes",
    )
    p.add_argument(
        "--skip-dilation-check",
        action="store_true",
        help="device time on an emulated cluster: do not measure, before the run, whether this machine's CPU "
        "keeps up with the emulated links at --dilation (an all-to-all alone at K and 2K, a few seconds)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument(
        "--check-collectives",
        action="store_true",
        help="after every step, compare the collectives each rank issued per process group (one tiny "
        "all-gather); stop naming the first difference",
    )
    p.add_argument(
        "--verbose", action="store_true", help="forward the launchers' own log lines; a failed worker's traceback"
    )
    p.add_argument(
        "--hf-model",
        metavar="DIR",
        help="fine-tune a Hugging Face checkpoint folder (config.json + safetensors; Mixtral, Qwen2-MoE, "
        "Qwen3-MoE, OLMoE, DeepSeek-V3) instead of the built-in GPT; its config fixes experts, top-k and "
        "widths; needs pip install 'lina[hf]'",
    )
    p.set_defaults(func=run)


class _PolicyOption(argparse.Action):
    """``--policy``; its old spelling ``--schedule`` still works, with a note."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == "--schedule":
            print("lina: note: --schedule is now called --policy; --schedule is still accepted", file=sys.stderr)
        setattr(namespace, self.dest, values)


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- TOML file <- command-line options; validated (ConfigError on any problem, all
    problems of the config at once)."""
    base = load_toml(args.config) if args.config else {}
    overrides = {
        field: getattr(args, opt) for opt, field in OPTION_FIELDS.items() if getattr(args, opt, None) is not None
    }
    if args.capacity_factor is not None:
        overrides["model.dropless"] = False
    if args.resume:
        overrides["output.resume"] = True
    if args.check_collectives:
        overrides["comm.check_collectives"] = True
    merged = merge(base, overrides)
    if getattr(args, "cluster", None):
        merged = _with_cluster(args.cluster, merged)
    emulation = merged.get("emulation") if isinstance(merged.get("emulation"), dict) else {}
    emulate = emulation.get("emulate", "none")
    if "workers" not in merged and emulate != "none":  # one worker per emulated slot, rates in real units
        from lina.emulation_spec import parse_emulate

        spec = parse_emulate(emulate, emulation.get("dilation", 1.0))
        if spec is not None:
            merged["workers"] = spec.world_size
    if isinstance(merged.get("model"), dict) and merged["model"].get("hf_model"):
        merged = _with_checkpoint_shape(merged)
    problems: list = []
    cfg = TrainConfig.from_dict(merged, problems)
    raise_all(problems + cfg.problems())
    from lina.cluster.launch import under_torchrun

    if (
        cfg.output.resume and not under_torchrun()
    ):  # under torchrun each worker checks it (the folder may be on its host only)
        from lina.train import checkpoint
        from lina.train.resume import check_model

        folder, meta = checkpoint.resume_point(Path(cfg.output.out) / "checkpoints")
        check_model(cfg, meta, folder)
    return cfg


def _with_cluster(name: str, merged: dict) -> dict:
    """``--cluster NAME``: the emulated cluster, worker count, compute and dilation of a named real
    cluster (compute and dilation only where neither the options nor the file set them).
    ``merged``: the file's settings with the options over them, sections nested."""
    from lina.cluster.presets import fit_preset, require_device_time
    from lina.errors import ConfigError

    emulation = dict(merged.get("emulation") or {})
    for key, given in (("emulate", "emulate" in emulation), ("workers", "workers" in merged)):
        if given:
            raise ConfigError(
                key, f"--cluster {name} sets it", f"drop --{key} (and {key} from the config file), or drop --cluster"
            )
    require_device_time(name, emulation.get("compute"))
    fitted = fit_preset(name, dilation=emulation.get("dilation"))
    if fitted.note:
        print(f"lina train: {fitted.note}", file=sys.stderr)
    emulation |= {"emulate": fitted.emulate, "dilation": fitted.dilation}
    emulation.setdefault("compute", fitted.preset.device)
    return {**merged, "workers": fitted.workers, "emulation": emulation}


def _with_checkpoint_shape(merged: dict) -> dict:
    """Take experts, top-k, widths, depth and vocabulary from the checkpoint's config.json (an
    option that contradicts it is an error); the sequence length must fit its positions."""
    from lina.config import ModelConfig
    from lina.errors import ConfigError
    from lina.hf.lm import checkpoint_model_fields

    model = dict(merged["model"])
    fields = checkpoint_model_fields(model["hf_model"])
    max_positions = fields.pop("max_positions")
    for key in ("experts", "top_k"):
        if key in model and model[key] != fields[key]:
            raise ConfigError(
                f"model.{key}",
                f"{model[key]} contradicts the checkpoint's {fields[key]}",
                f"drop --{key.replace('_', '-')}: --hf-model fixes it",
            )
    model.update(fields)
    seq_len = model.get("seq_len", ModelConfig().seq_len)
    if seq_len > max_positions:
        raise ConfigError(
            "model.seq_len",
            f"{seq_len} exceeds the checkpoint's {max_positions} positions",
            f"set seq_len <= {max_positions} in the [model] table",
        )
    model["hf_model"] = str(Path(model["hf_model"]).resolve())
    return {**merged, "model": model}


def run(args: argparse.Namespace) -> int:
    from lina.cluster.launch import launch_local, under_torchrun
    from lina.train import worker

    cfg = build_config(args)
    spec = cfg.emulate_spec()
    check = None
    if (
        spec is not None
        and cfg.emulation.device_time
        and not under_torchrun()
        and not getattr(args, "skip_dilation_check", False)
    ):
        check = dilation_check(
            cfg, chosen_by_cluster=bool(getattr(args, "cluster", None)) and getattr(args, "dilation", None) is None
        )
        spec = cfg.emulate_spec()
    if under_torchrun():
        summary = worker.run(cfg.to_dict())
    elif spec is not None:
        summary = run_emulated(cfg, spec, verbose=args.verbose)
    else:
        summary = launch_local(worker.run, (cfg.to_dict(),), cfg.workers, verbose=args.verbose)[0]
    if summary is not None and check is not None:
        summary["dilation_check"] = check.to_dict()
    if summary is not None:
        _stamp(summary, [Path(cfg.output.out)] + ([Path(cfg.output.trace)] if cfg.output.trace else []))
        print_summary(summary, Path(cfg.output.out))
        if cfg.output.trace:
            from lina.obs.report import write_trace_report

            write_trace_report(Path(cfg.output.trace))
    return 0


def dilation_check(cfg: TrainConfig, chosen_by_cluster: bool = False):
    """Measure an all-to-all alone at the run's dilation K and at 2K on its emulated cluster
    (:mod:`lina.cluster.dilation_check`); refuse a K at which this machine's CPU sets its speed.
    A K that ``--cluster`` chose is raised to the smallest passing one instead (said so)."""
    from lina.cluster.dilation_check import startup_check

    check = startup_check(
        cfg.emulation.emulate, cfg.emulation.dilation, "lina train", chosen_for_the_user=chosen_by_cluster
    )
    cfg.emulation.dilation = check.dilation
    return check


def _stamp(summary: dict, folders: list[Path]) -> None:
    """Add ``"provenance"`` (of this command) to the run's summary and rewrite its summary.json files."""
    from lina.obs.provenance import provenance

    summary["provenance"] = provenance()
    for folder in folders:
        if (folder / "summary.json").exists():
            (folder / "summary.json").write_text(json.dumps(summary, indent=2))


def run_emulated(cfg: TrainConfig, spec, verbose: bool = False) -> dict:
    """Train on an emulated cluster: one torchrun agent per host namespace, links rate-limited."""
    from lina.cluster.emulate import EmulatedCluster
    from lina.cluster.hostlaunch import run_on_cluster

    out = Path(cfg.output.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg.output.out = str(out)
    if cfg.output.trace:
        cfg.output.trace = str(Path(cfg.output.trace).resolve())
    config_path = out / "config.json"
    config_path.write_text(json.dumps(cfg.to_dict(), indent=2))
    from lina.cluster.spec import describe

    print(f"lina train: emulated cluster {describe(spec, cfg.emulation.dilation)}", flush=True)
    with EmulatedCluster(spec) as cluster:
        run_on_cluster(cluster, "lina.train.worker", [str(config_path)], spec.workers_per_host, verbose=verbose)
    return json.loads((out / "summary.json").read_text())


def print_summary(summary: dict, out: Path) -> None:
    split = summary["time_split_s"]
    total = split["compute"] + split["all_to_all"] + split["allreduce_exposed"]
    pct = {k: 100 * v / total if total else 0.0 for k, v in split.items()}
    print(f"\nsummary (policy {summary.get('policy', '?')})")
    if summary["final_loss"] is None:
        print("  loss: not computed (device-time compute: the arithmetic is not done)")
    else:
        print(f"  loss (last 10 steps) {summary['final_loss']:.4f}   validation loss {summary['val_loss']:.4f}")
    print(
        f"  tokens/s {summary['tokens_per_s']:.0f}   median step {summary['step_time_s_median'] * 1e3:.1f} ms   wall "
        f"{summary['wall_s']:.1f} s"
    )
    print(
        f"  time split: compute {pct['compute']:.1f}%  all-to-all {pct['all_to_all']:.1f}%  "
        f"allreduce exposed {pct['allreduce_exposed']:.1f}%  (allreduce in flight {split['allreduce_in_flight']:.2f} s)"
    )
    packing = summary.get("packing")
    if packing:
        changes = [d for d in packing["decisions"] if d["new_experts_per_rank"] != d["experts_per_rank"]]
        print(
            f"  packing {packing['mode']}: {packing['experts_per_rank']} experts per rank (EP size "
            f"{packing['ep_size']}) at the end, "
            f"{len(changes)} change(s), {len(packing['decisions'])} decision(s)"
        )
    check = summary.get("dilation_check")
    if check:
        print(
            f"  link efficiency: an all-to-all alone reached {check['link_efficiency']:.0%} of the link rate at "
            f"dilation {check['dilation']:g} (the start-up check)"
        )
    mem = summary.get("expert_memory")
    if mem and mem["budget_mb"] > 0:
        print(
            f"  expert memory budget {mem['budget_mb']:g} MB: {mem['offloaded_experts']} experts offloaded to host "
            f"({mem['offloaded_mb']:.2f} MB), brought in {mem['copies_in']} times ({mem['mb_in']:.1f} MB) on rank 0"
        )
    print(f"  wrote {out / 'metrics.jsonl'}, {out / 'summary.json'}, {out / 'checkpoints'}")
    print(json.dumps({k: summary[k] for k in ("final_loss", "val_loss", "tokens_per_s")}))

"""``lina bench train``: training step time of ``ddp-overlap``, ``sequential``, ``tutel``, ``lina`` and
``lina+packing`` on the emulated cluster, interleaved in one run, in a pair (2 hosts x 1 worker), a
flat layout (4 hosts x 1 worker) and a hierarchical one (2 hosts x 2 workers), top-2. By default
each layout has as many experts as workers, one expert per rank, as in the paper's evaluation
("experts = GPUs"); ``--experts 8,16`` runs more experts than workers instead.
``lina+packing`` is the ``lina`` policy with expert packing, decided by the packing controller
during its warm-up (4 steps at each packing, the controller's re-check period); the packing
chosen is reported per config.

Links run at ``--link`` (400 Mbit/s by default); ``--link auto`` calibrates the rate per layout so
that ``ddp-overlap``'s all-to-all share of step time lands in the paper's 30-45%. The regime is
printed beside every speedup. The lower bound of a config is
the critical path with compute as measured in the same run, every all-to-all at its uncontended
speed (the ``sequential`` policy's, which runs no allreduce during backward) and all allreduce
hidden: median(sequential step - sequential's post-backward allreduce).

Per policy it also reports how busy expert compute is while all-to-all is in flight: the share of
all-to-all time during which an expert-FFN span runs on the same rank (the paper's Table 3: 33-36%
without packing, 79-86% with it).

Peers (``--peers``, :mod:`lina.bench.peers`): the real DeepSpeed-MoE (ZeRO-0, ZeRO-2) trains its own
copy of the model in the same workers, after lina's policies in every round, in the same table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lina.bench.peers import PEER_NAMES, resolve_peers
from lina.bench.plan import TrainBenchPlan
from lina.bench.train_report import analyse, plot, print_report
from lina.cluster.emulate import EmulatedCluster, EmulateSpec, format_rate, parse_rate
from lina.cluster.hostlaunch import run_on_cluster
from lina.cluster.presets import PRESETS
from lina.cluster.spec import describe
from lina.config import EmulationConfig
from lina.errors import ConfigError
from lina.obs.timeline import load_rank_timelines
from lina.policy import BASELINE_POLICY, BENCH_POLICIES, TRAIN_POLICIES, canonical_policy_name, train_policy
from lina.policy.training import NO_SYNC_SUFFIX
from lina.sim.a2a_skew import a2a_skew

LAYOUTS = {"pair": (2, 1), "flat": (4, 1), "hierarchical": (2, 2)}
PACKING_WINDOW = 4  # steps measured at each packing before a decision (the controller's packing_every)
TARGET_SHARE = 0.38
BENCH_MODEL = {"d_model": 256, "n_layers": 4, "n_heads": 4, "d_ff": 512, "seq_len": 64, "top_k": 2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="flat layout, 4 experts, 2 rounds (about a minute; for tests)")
    p.add_argument(
        "--json",
        metavar="FILE",
        default="runs/bench-train/bench-train.json",
        help="results; the PNG and run folders go beside it",
    )
    p.add_argument(
        "--link",
        default=None,
        help="each host's link rate, or 'auto': calibrate it so ddp-overlap's all-to-all share lands in the paper's "
        "30-45%% (about 4gbit here, where the all-to-all is bound by the shared cores more than by the link) "
        "(default 400mbit)",
    )
    p.add_argument(
        "--intra",
        default="off",
        help="each host's intra-host link (between its workers; real-cluster units, divided by --dilation "
        "like --link), or off: free loopback (default off)",
    )
    p.add_argument(
        "--cluster",
        choices=sorted(PRESETS),
        default=None,
        help="emulate a named real cluster instead of --layouts/--link/--intra: paper = 4 hosts x 4 A100, "
        "100 Gb/s, NVLink inside (compute a100 unless --compute says otherwise; as many workers per host as "
        "this machine holds; a dilation that keeps every emulated rate within what tc shapes)",
    )
    p.add_argument(
        "--layouts",
        default=None,
        help="(default pair,flat,hierarchical) comma list of pair (2x1), flat (4x1), hierarchical (2x2)",
    )
    p.add_argument(
        "--experts",
        default="workers",
        help="'workers' (one expert per rank, as in the paper) or a comma list of expert counts",
    )
    p.add_argument(
        "--policies",
        default=",".join(BENCH_POLICIES),
        help="comma list of training policies (lina.policy; module:NAME for one of your own), "
        "interleaved in this order",
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaving rounds after warm-up")
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per policy")
    p.add_argument(
        "--settle",
        type=int,
        default=6,
        help="unmeasured steps after each switch that moves the experts to another layout (into and "
        "out of lina+packing's "
        "packing): the first steps after a move run up to 20%% faster than the steady state here (--quick: 1)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences per rank per step (default 32: 2048 tokens per rank, so that, as in real MoE training, a step "
        "moves more all-to-all bytes than its experts have gradient bytes; --quick: 4)",
    )
    p.add_argument("--chunk-mb", default="auto")
    p.add_argument(
        "--buckets",
        type=int,
        default=16,
        help="DDP buckets per step for ddp-overlap/tutel: the bucket size is the model's "
        "non-expert gradient bytes / this (the paper's 100M+ models fill about 16 buckets of 25 MB); 0: 25 MB buckets",
    )
    p.add_argument("--pipeline-chunks", type=int, default=2)
    p.add_argument("--credit", type=int, default=1, help="lina: allreduce micro-ops in flight at once")
    p.add_argument("--delay", default="0us", help="one-way host-to-host delay (needs the netem qdisc)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compute",
        default=None,
        help="real (compute on this CPU) or a device (a100, h100, h200, a .toml): every "
        "compute op takes that device's time x --dilation instead of being computed; --link is then the real cluster's "
        "(default real; with --cluster: its device)",
    )
    p.add_argument(
        "--dilation",
        type=float,
        default=None,
        help="time dilation K with --compute DEVICE: device times x K, emulated link = --link / K "
        "(default 1; with --cluster: the smallest that tc can shape)",
    )
    p.add_argument(
        "--skip-dilation-check",
        action="store_true",
        help="with --compute DEVICE: do not measure, before each layout, whether this machine's CPU keeps up with "
        "the emulated links at --dilation (an all-to-all alone at K and 2K, a few seconds)",
    )
    p.add_argument(
        "--routing-trace",
        default="",
        metavar="FILE",
        help="routing of a device-time run (.npz of lina infer "
        "--record-trace or a vLLM .jsonl; a trace of m x E experts routes to expert e mod E)",
    )
    p.add_argument(
        "--bounds",
        default="",
        metavar="LIST",
        help="policies whose lower bound to measure: each also runs as "
        "POLICY/no-sync (its gradient allreduce off, timing only) in the same interleaving, e.g. --bounds lina",
    )
    p.add_argument(
        "--peers",
        default=None,
        help=f"real frameworks run beside the policies, in the same processes, after them in every "
        f"round: comma list of {', '.join(PEER_NAMES)}, or none (default: all when the deepspeed "
        "package imports; pip install 'lina[peers]')",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--hf-model",
        metavar="DIR",
        help="benchmark a Hugging Face checkpoint folder instead of the built-in GPT (its config fixes "
        "experts and top-k; needs pip install 'lina[hf]')",
    )
    src.add_argument(
        "--family",
        choices=("mixtral", "qwen3_moe", "deepseek_v3"),
        help="benchmark a random checkpoint of this family, scaled down (Mixtral 8 experts top-2; "
        "Qwen3-MoE 64 fine-grained experts top-8; DeepSeek-V3 32 experts top-4 with a shared expert)",
    )


def _plan(
    args, layout: str, experts: list[int], policies: list[str], link_bps: int, out: Path, **over
) -> TrainBenchPlan:
    hosts, wph = _layouts(args)[layout]
    fields = dict(
        layout=layout,
        hosts=hosts,
        workers_per_host=wph,
        link_bps=link_bps,
        intra_bps=_intra_bps(args),
        experts=tuple(experts),
        policies=tuple(policies),
        model=getattr(args, "model_dict", BENCH_MODEL),
        batch_size=args.batch_size,
        chunk_mb=str(args.chunk_mb),
        buckets=args.buckets,
        pipeline_chunks=args.pipeline_chunks,
        credit=args.credit,
        seed=args.seed,
        warmup=args.warmup,
        rounds=args.rounds,
        steps_per_round=args.steps_per_round,
        settle=args.settle,
        out=str(out),
        packing_window=2 if args.quick else PACKING_WINDOW,
        compute=args.compute,
        dilation=args.dilation,
        routing_trace=args.routing_trace,
        peers=tuple(getattr(args, "peer_list", ())),
    )
    return TrainBenchPlan(**{**fields, **over})


def _launch(plan: TrainBenchPlan, delay_us: float) -> list[dict]:
    out = Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    path = plan.save(out / f"plan-{plan.layout}.json")
    # with time dilation K the links are the real cluster's / K (and delays K times longer)
    spec = EmulateSpec(
        hosts=plan.hosts,
        workers_per_host=plan.workers_per_host,
        link_bps=emulated_rate(plan.link_bps, plan.dilation),
        delay_us=delay_us * plan.dilation,
        intra_bps=emulated_rate(plan.intra_bps, plan.dilation),
    )
    with EmulatedCluster(spec) as cluster:
        run_on_cluster(cluster, "lina.bench.train_worker", [str(path)], spec.workers_per_host, timeout_s=3000)
    return json.loads((out / f"results-{plan.layout}.json").read_text())


def calibrate_link(args, layout: str, experts: int, out: Path, delay_us: float) -> tuple[int, float]:
    """Measure ddp-overlap at a first rate and rescale the rate so its all-to-all share lands near
    TARGET_SHARE (all-to-all time scales with 1 / rate, compute does not)."""
    rate = parse_rate("150mbit")
    for _attempt in range(2):
        plan = _plan(
            args,
            layout,
            [experts],
            [BASELINE_POLICY],
            rate,
            out / "calibration",
            warmup=1,
            rounds=3,
            steps_per_round=1,
            peers=(),
        )
        res = _launch(plan, delay_us)[0]["policies"][BASELINE_POLICY]
        share = res["a2a_s"] / res["step_time_s"]
        print(
            f"calibration ({layout}): link {format_rate(rate)} -> ddp-overlap all-to-all share {share * 100:.1f}%",
            flush=True,
        )
        if 0.30 <= share <= 0.45:
            break
        compute = res["step_time_s"] - res["a2a_s"]
        wanted_a2a = TARGET_SHARE / (1 - TARGET_SHARE) * compute
        rate = int(min(max(rate * res["a2a_s"] / wanted_a2a, 5e6), 4e9))
    return rate, share


def _skews(out: Path, layout: str, entry: dict) -> dict[str, float]:
    """Per policy, the all-to-all skew of its measured steps, read from its run folder's timelines."""
    skews = {}
    for policy in entry["policies"]:
        spans = load_rank_timelines(out / "runs" / f"{layout}-e{entry['experts']}-{policy}")
        if spans:
            skews[policy] = a2a_skew(spans)
    return skews


def _parse_experts(text: str):
    """``workers`` or ``4,8,16`` -> a function of a layout's worker count giving its expert counts."""
    if text.strip() == "workers":
        return lambda workers: [workers]
    try:
        counts = [int(e) for e in text.split(",") if e.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(
            "experts",
            f"{text!r} is not 'workers' or a comma list of positive counts",
            "use e.g. --experts workers or --experts 4,8,16",
        )
    return lambda workers: counts


def _layouts(args) -> dict[str, tuple[int, int]]:
    """Layout name -> (hosts, workers per host): the fixed ones, plus ``--cluster``'s."""
    fitted = getattr(args, "fitted_cluster", None)
    return LAYOUTS if fitted is None else {fitted.preset.name: (fitted.preset.hosts, fitted.workers_per_host)}


def _intra_bps(args) -> int:
    """``--intra`` in bits/s of the real cluster (0: free loopback)."""
    text = getattr(args, "intra", "off") or "off"
    return 0 if text.strip().lower() in ("off", "none", "0") else parse_rate(text, field="intra")


def apply_cluster(args, command: str = "lina bench train") -> None:
    """``--cluster NAME``: the named cluster's layout, rates, device and dilation (a given
    --compute or --dilation is kept; --layouts/--link/--intra contradict it). Without it, the
    defaults: pair,flat,hierarchical at 400mbit, free loopback, real compute, no dilation."""
    if not getattr(args, "cluster", None):
        args.layouts = args.layouts or "pair,flat,hierarchical"
        args.link = args.link or "400mbit"
        args.compute = args.compute or "real"
        args.dilation = 1.0 if args.dilation is None else args.dilation
        return
    from lina.cluster.presets import fit_preset, require_device_time

    for option in ("layouts", "link"):
        if getattr(args, option, None):
            raise ConfigError(option, f"--cluster {args.cluster} sets it", f"drop --{option}, or drop --cluster")
    if (getattr(args, "intra", "off") or "off") != "off":
        raise ConfigError("intra", f"--cluster {args.cluster} sets it", "drop --intra, or drop --cluster")
    require_device_time(args.cluster, args.compute)
    args.dilation_chosen_by_cluster = args.dilation is None
    fitted = fit_preset(args.cluster, dilation=args.dilation)
    args.fitted_cluster = fitted
    args.layouts = fitted.preset.name
    args.link = format_rate(fitted.preset.link_bps)
    args.intra = format_rate(fitted.preset.intra_bps)
    args.compute = args.compute or fitted.preset.device
    args.dilation = fitted.dilation
    print(f"{command}: cluster {fitted.preset.name}: {fitted.preset.source}", flush=True)
    if fitted.note:
        print(f"{command}: {fitted.note}", flush=True)


def check_layout_dilation(args, hosts: int, wph: int, link_bps: int, command: str = "lina bench train"):
    """The start-up dilation check (:func:`lina.cluster.dilation_check.startup_check`) for one
    layout of a device-time run: None for real compute or with --skip-dilation-check. A dilation
    that ``--cluster`` chose is raised to the smallest passing one; a given one that fails is refused."""
    if args.compute == "real" or getattr(args, "skip_dilation_check", False):
        return None
    from lina.cluster.dilation_check import startup_check

    emulate = f"hosts={hosts},link={format_rate(link_bps)},workers_per_host={wph}"
    if _intra_bps(args):
        emulate += f",intra={format_rate(_intra_bps(args))}"
    by_cluster = getattr(args, "dilation_chosen_by_cluster", False)
    check = startup_check(emulate, args.dilation, command, chosen_for_the_user=by_cluster)
    args.dilation = check.dilation
    return check


def emulated_rate(link_bps: int, dilation: float) -> int:
    """The emulated link of a real one under time dilation: link / K, to the kbit/s."""
    return int(link_bps / dilation) // 1000 * 1000


def _check_compute(args) -> None:
    """The compute mode, dilation and routing trace, checked before any cluster is built (the
    DeepSpeed peers take the same mode: device-time compute and the trace's routing)."""
    EmulationConfig(compute=args.compute, dilation=args.dilation, routing_trace=args.routing_trace).validate_compute()


def _check_policies(policies: list[str]) -> None:
    """Every name a registered training policy the trainer can run (ConfigError otherwise)."""
    trainable = ", ".join(n for n, p in TRAIN_POLICIES.items() if p.trainable)
    if not policies or not all(policies):
        raise ConfigError("policies", f"{','.join(policies)!r} names no policy", f"use a comma list of {trainable}")
    for name in policies:
        if not train_policy(name).trainable:
            raise ConfigError("policies", f"{name!r} exists in the simulator only", f"use a comma list of {trainable}")


def _checkpoint_model(args, out: Path):
    """The model settings and expert count of ``--hf-model`` / ``--family`` (a family's scaled-down
    checkpoint is written under OUT/families first)."""
    from lina.hf.lm import checkpoint_model_fields

    folder = args.hf_model
    if args.family:
        from lina.hf.tiny import make_bench_family

        folder = make_bench_family(args.family, out / "families" / args.family, seed=args.seed)
    fields = checkpoint_model_fields(folder)
    if fields.pop("max_positions") < BENCH_MODEL["seq_len"]:
        raise ConfigError(
            "hf-model",
            f"{folder} has fewer than {BENCH_MODEL['seq_len']} positions",
            "use a checkpoint with max_position_embeddings >= 64",
        )
    model = {"seq_len": BENCH_MODEL["seq_len"], **fields, "hf_model": str(Path(folder).resolve())}
    return model, lambda workers: [fields["experts"]]


def run(args: argparse.Namespace) -> int:
    from lina.cluster.emulate import parse_duration_us

    apply_cluster(args)
    if args.quick:
        args.layouts, args.experts, args.rounds, args.steps_per_round, args.warmup, args.settle = (
            args.layouts if getattr(args, "fitted_cluster", None) else "flat",
            "4",
            2,
            1,
            1,
            1,
        )
    if args.batch_size is None:
        args.batch_size = 4 if args.quick else 32
    if args.settle < 0:
        raise ConfigError("settle", f"{args.settle} steps", "use --settle 0 (measure right after a move) or more")
    if args.batch_size < 1:
        raise ConfigError("batch-size", f"{args.batch_size} sequences per rank", "use --batch-size 1 or more")
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    bad = [name for name in layouts if name not in _layouts(args)]
    if bad or not layouts:
        raise ConfigError(
            "layouts", f"unknown layout {', '.join(bad) or '(none given)'}", f"use a comma list of {', '.join(LAYOUTS)}"
        )
    _intra_bps(args)  # checked before any cluster is built
    experts_of = _parse_experts(args.experts)
    json_path = Path(args.json)
    if getattr(args, "family", None) or getattr(args, "hf_model", None):
        args.model_dict, experts_of = _checkpoint_model(args, json_path.parent)
    policies = [canonical_policy_name(p.strip()) for p in args.policies.split(",")]
    _check_policies(policies)
    bounds = [canonical_policy_name(b.strip()) for b in args.bounds.split(",") if b.strip()]
    _check_policies(bounds or ["lina"])
    policies += [f"{b}{NO_SYNC_SUFFIX}" for b in bounds if f"{b}{NO_SYNC_SUFFIX}" not in policies]
    _check_compute(args)
    args.peer_list, peer_note = resolve_peers(args.peers)
    if peer_note:
        print(peer_note, flush=True)
    json_path = Path(args.json)
    out = json_path.parent
    delay_us = parse_duration_us(args.delay)
    configs = []
    for layout in layouts:
        link_bps = parse_rate(args.link) if args.link != "auto" else 0
        hosts, wph = _layouts(args)[layout]
        experts = experts_of(hosts * wph)
        if args.link == "auto":
            link_bps, _ = calibrate_link(args, layout, experts[0], out, delay_us)
        check = check_layout_dilation(args, hosts, wph, link_bps)
        shape = EmulateSpec(
            hosts=hosts,
            workers_per_host=wph,
            link_bps=emulated_rate(link_bps, args.dilation),
            intra_bps=emulated_rate(_intra_bps(args), args.dilation),
        )
        print(
            f"\n{layout}: {describe(shape, args.dilation)}, delay {args.delay}, "
            f"compute {args.compute}{'' if args.compute == 'real' else f' x {args.dilation:g}'}; "
            f"policies {', '.join(policies + args.peer_list)} interleaved, {args.rounds} rounds x "
            f"{args.steps_per_round} steps after {args.warmup} warm-up, "
            f"{args.settle} unmeasured after each move of the experts",
            flush=True,
        )
        for entry in _launch(_plan(args, layout, experts, policies, link_bps, out), delay_us):
            configs.append(analyse(entry, layout, link_bps, hosts, wph, _skews(out, layout, entry)))
            configs[-1]["regime"].update(
                compute=args.compute,
                dilation=args.dilation,
                emulated_link=format_rate(emulated_rate(link_bps, args.dilation)),
                intra=format_rate(_intra_bps(args)) if _intra_bps(args) else "off",
                emulated_intra=format_rate(emulated_rate(_intra_bps(args), args.dilation))
                if _intra_bps(args)
                else "off",
                link_efficiency=None if check is None else check.link_efficiency,
                dilation_check=None if check is None else check.to_dict(),
            )
    result = {
        "regime": {
            "link": format_rate(configs[0]["regime"]["link_bps"]),
            "a2a_share_ddp_overlap": configs[0]["regime"]["a2a_share_ddp_overlap"],
            "allreduce_to_a2a_bytes": configs[0]["regime"]["allreduce_to_a2a_bytes"],
            "delay": args.delay,
            "compute": args.compute,
            "dilation": args.dilation,
            "emulated_link": format_rate(emulated_rate(configs[0]["regime"]["link_bps"], args.dilation)),
            "intra": configs[0]["regime"]["intra"],
            "emulated_intra": configs[0]["regime"]["emulated_intra"],
            "cluster": getattr(args, "cluster", None),
            "link_efficiency": configs[0]["regime"]["link_efficiency"],
            "note": "regime of the first config; every config carries its own; links in real-cluster units",
        },
        "model": getattr(args, "model_dict", BENCH_MODEL) | {"batch_size": args.batch_size},
        "policies": policies + args.peer_list,
        "peers": args.peer_list,
        "configs": configs,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    from lina.obs.provenance import provenance

    json_path.write_text(json.dumps(result | {"provenance": provenance()}, indent=2))
    plot(result, json_path.with_suffix(".png"))
    print_report(result)
    print(f"\nwrote {json_path}, {json_path.with_suffix('.png')}, run folders under {out / 'runs'}")
    return 0

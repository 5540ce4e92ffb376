"""What a routing trace says about Lina's inference premise, measured.

* :func:`popularity_skew` — how uneven each layer's expert popularity is.
* :func:`inter_layer_affinity` — the paper's observation: tokens that shared an expert at
  layer i tend to share the next one (paper: 41.94% top-1 / 54.59% top-2).
* :func:`accuracy_by_path_len` — estimator accuracy for path lengths ``l``, fitted on one
  part of the trace and scored on a held-out part.
* :func:`analyze_trace` — all of it, plus placement balance, as one JSON-able dict;
  :func:`write_plots` draws the PNGs next to the JSON.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lina.data.routing_trace import RoutingTrace
from lina.errors import ConfigError
from lina.extras import pyplot
from lina.infer.replay import placement_balance
from lina.placement.estimators import LogisticEstimator, OnlinePathEstimator, PathEstimator, PopularityEstimator
from lina.placement.evaluate import score_estimator

Progress = Callable[[str], None]

# Estimators compared by accuracy_by_path_len: name -> factory(path_len, fit_trace).
ESTIMATORS: dict[str, Callable[[int, RoutingTrace], PopularityEstimator]] = {
    "path": lambda l, tr: PathEstimator(l).fit(tr),
    "path-smoothed": lambda l, tr: PathEstimator(l, smoothing=1.0).fit(tr),
    "online-path": lambda l, tr: OnlinePathEstimator.from_offline(PathEstimator(l).fit(tr), decay=0.9),
    "logistic": lambda l, tr: LogisticEstimator(l).fit(tr),
}
PAPER_ESTIMATOR = "path"


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def popularity_skew(trace: RoutingTrace) -> dict:
    """Per-layer skew of top-1 picks (and of all k token-slots).

    Returns a dict with ``top1_counts`` ``[L][E]``, ``max_min_ratio`` ``[L]`` (most over
    least picked expert; None where some expert got no top-1 pick), ``cv`` ``[L]``
    (std / mean of the counts), the same two for token-slots (``slot_*``), and summary
    medians / means.
    """
    top1 = trace.top1()
    counts = torch.stack(
        [torch.bincount(top1[:, j], minlength=trace.num_experts) for j in range(trace.num_layers)]
    ).double()
    slots = trace.slot_counts()

    def ratio(c: torch.Tensor) -> list[float]:
        return [float(r.max() / r.min()) if r.min() > 0 else math.inf for r in c]

    def cv(c: torch.Tensor) -> list[float]:
        return (c.std(dim=1, unbiased=False) / c.mean(dim=1)).tolist()

    r1, rs = ratio(counts), ratio(slots)
    return {
        "top1_counts": counts.long().tolist(),
        "max_min_ratio": [_finite(x) for x in r1],
        "cv": cv(counts),
        "slot_max_min_ratio": [_finite(x) for x in rs],
        "slot_cv": cv(slots),
        "median_max_min_ratio": _finite(float(np.median(r1))),
        "median_slot_max_min_ratio": _finite(float(np.median(rs))),
        "mean_cv": float(np.mean(cv(counts))),
        "layers_with_unpicked_expert": int(sum(not math.isfinite(x) for x in r1)),
    }


def inter_layer_affinity(trace: RoutingTrace) -> dict:
    """For tokens grouped by their top-1 expert at layer i: share whose top-1 at layer i+1 is
    the group's most common next expert (``top1``) or one of its two most common (``top2``).

    Shares are over all tokens (groups weighted by size). ``baseline_*`` is the same with a
    single group (the layer's most popular next experts), i.e. what popularity alone explains.
    Returns per-layer lists (index i = transition i -> i+1) and their means.
    """
    top1 = trace.top1().numpy()
    tokens, layers = top1.shape
    e = trace.num_experts
    out = {"top1": [], "top2": [], "baseline_top1": [], "baseline_top2": []}
    for i in range(layers - 1):
        pair = np.zeros((e, e), dtype=np.int64)
        np.add.at(pair, (top1[:, i], top1[:, i + 1]), 1)
        ranked = -np.sort(-pair, axis=1)
        out["top1"].append(float(ranked[:, 0].sum() / tokens))
        out["top2"].append(float(ranked[:, :2].sum() / tokens))
        marginal = -np.sort(-pair.sum(axis=0))
        out["baseline_top1"].append(float(marginal[0] / tokens))
        out["baseline_top2"].append(float(marginal[:2].sum() / tokens))
    summary = {f"mean_{k}": float(np.mean(v)) if v else None for k, v in out.items()}
    half = (layers - 1) // 2
    summary["mean_top1_first_half"] = float(np.mean(out["top1"][:half])) if half else None
    summary["mean_top1_second_half"] = float(np.mean(out["top1"][half:])) if half else None
    return {**out, **summary}


def accuracy_by_path_len(
    fit: RoutingTrace,
    test: RoutingTrace,
    path_lens: list[int],
    estimators: dict[str, Callable[[int, RoutingTrace], PopularityEstimator]] | None = None,
    batch_tokens: int = 16,
    progress: Progress | None = None,
) -> dict:
    """Fit each estimator for each ``l`` on ``fit`` and score it on ``test``.

    Every ``l`` is scored on the same layers, ``[max(path_lens), L)``, so the numbers
    compare; ``l = 0`` (the layer's marginal popularity, no path) is added as reference.
    Returns ``{"layers": [...], "path_lens": [...], name: {str(l): EstimatorScore dict}}``.
    """
    estimators = ESTIMATORS if estimators is None else estimators
    if not path_lens or min(path_lens) < 1:
        raise ConfigError("path_lens", f"is {path_lens}", "give path lengths >= 1, e.g. 1,2,3,4,5,6")
    first = max(path_lens)
    if first >= fit.num_layers:
        raise ConfigError("path_lens", f"max {first} leaves no layer of {fit.num_layers} to score", "use shorter paths")
    layers = list(range(first, fit.num_layers))
    lens = [0, *sorted(set(path_lens))]
    result: dict = {"layers": layers, "path_lens": lens, "fit_tokens": fit.num_tokens, "test_tokens": test.num_tokens}
    for name, make in estimators.items():
        result[name] = {}
        for l in lens:
            start = time.perf_counter()
            est = make(l, fit)
            fitted_s = time.perf_counter() - start
            score = score_estimator(est, test, layers, batch_tokens).as_dict()
            score["fit_s"] = fitted_s
            if isinstance(est, LogisticEstimator):
                score["weight_decay"] = est.chosen_weight_decay
            result[name][str(l)] = score
            if progress:
                progress(
                    f"  {name:14s} l={l}: top-{fit.top_k} set {score['token_topk']:.3f}  top-1 "
                    f"{score['token_top1']:.3f}  "
                    f"batch top-{2 * fit.top_k} {score['batch_match']:.3f}  (fit {fitted_s:.2f}s)"
                )
    return result


def trace_splits(trace: RoutingTrace, position_frac: float = 0.7) -> dict[str, tuple[RoutingTrace, RoutingTrace]]:
    """Held-out splits: ``seq`` (the first 70% of sequences fit, the rest test; with two
    sequences one each), ``seq-reversed`` (the same two parts swapped, only when the trace
    has exactly two sequences), ``position`` (first ``position_frac`` of every sequence fit)."""
    splits = {}
    if len(np.unique(trace.seq_id)) >= 2:
        fit, test = trace.split(0.7, by="seq")
        splits["seq"] = (fit, test)
        if len(np.unique(trace.seq_id)) == 2:
            splits["seq-reversed"] = (test, fit)
    splits["position"] = trace.split(position_frac, by="position")
    return splits


def analyze_trace(
    trace: RoutingTrace,
    path_lens: list[int] = (1, 2, 3, 4, 5, 6),
    batch_tokens: int = 16,
    devices: list[int] = (4, 8),
    estimators: dict[str, Callable[[int, RoutingTrace], PopularityEstimator]] | None = None,
    balance_path_len: int = 3,
    progress: Progress | None = None,
) -> dict:
    """Skew, affinity, estimator accuracy on every split, and placement balance on the headline split.

    Headline split: ``seq`` when the trace has two or more sequences (a held-out request is
    what an offline-profiled estimator faces), else ``position``.
    """
    estimators = ESTIMATORS if estimators is None else estimators
    say = progress or (lambda _msg: None)
    out: dict = {
        "trace": {
            "source": trace.source,
            "tokens": trace.num_tokens,
            "layers": trace.num_layers,
            "experts": trace.num_experts,
            "top_k": trace.top_k,
            "sequences": int(len(np.unique(trace.seq_id))),
        },
        "batch_tokens": batch_tokens,
    }
    say("popularity skew per layer")
    out["skew"] = popularity_skew(trace)
    say("inter-layer affinity")
    out["affinity"] = inter_layer_affinity(trace)
    splits = trace_splits(trace)
    headline = "seq" if "seq" in splits else "position"
    out["headline_split"] = headline
    out["accuracy"] = {}
    for name, (fit, test) in splits.items():
        say(f"estimator accuracy, split {name}: fit {fit.num_tokens} tokens, test {test.num_tokens}")
        out["accuracy"][name] = accuracy_by_path_len(fit, test, list(path_lens), estimators, batch_tokens, progress)
    fit, test = splits[headline]
    layers = out["accuracy"][headline]["layers"]
    out["balance"] = {}
    for name in (n for n in (PAPER_ESTIMATOR, "logistic", "online-path") if n in estimators):
        for n_dev in devices:
            say(f"placement balance, split {headline}, estimator {name} l={balance_path_len}, {n_dev} devices")
            est = estimators[name](balance_path_len, fit)
            rep = placement_balance(est, test, n_dev, layers, batch_tokens).as_dict()
            out["balance"][f"{name}/N={n_dev}"] = rep
            replan = ", ".join(f"{n} {r:.2f}" for n, r in rep["replan_rate"].items())
            say(
                "    mean busiest/mean load: "
                + "  ".join(f"{p} {v:.3f}" for p, v in rep["mean"].items())
                + f"  (re-plan: {replan})"
            )
    return out


def write_plots(result: dict, out_dir: str | Path) -> list[Path]:
    """Draw skew per layer, affinity per layer, accuracy vs path length and placement balance as PNGs."""
    plt = pyplot(Path(out_dir) / "*.png")
    if plt is None:
        return []

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    source = result["trace"]["source"]

    skew = result["skew"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    layers = np.arange(len(skew["cv"]))
    ratios = [r if r is not None else np.nan for r in skew["max_min_ratio"]]
    ax1.bar(layers, ratios, color="tab:blue")
    ax1.set_ylabel("most / least picked\n(top-1 counts)")
    ax1.set_title(f"Expert popularity skew per layer — {source}")
    ax2.plot(layers, skew["cv"], "o-", label="top-1 picks")
    ax2.plot(layers, skew["slot_cv"], "s--", label="all top-k slots")
    ax2.set_ylabel("coefficient of variation")
    ax2.set_xlabel("MoE layer")
    ax2.legend()
    fig.tight_layout()
    written.append(out_dir / "skew_per_layer.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    aff = result["affinity"]
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(aff["top1"]))
    ax.plot(x, aff["top1"], "o-", label="group's top-1 next expert")
    ax.plot(x, aff["top2"], "s-", label="group's top-2 next experts")
    ax.plot(x, aff["baseline_top1"], ":", label="layer's top-1 (no grouping)")
    ax.plot(x, aff["baseline_top2"], "--", label="layer's top-2 (no grouping)")
    ax.set_xlabel("transition layer i -> i+1")
    ax.set_ylabel("share of tokens")
    ax.set_title("Tokens sharing an expert keep sharing the next one")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out_dir / "affinity_per_layer.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    k = result["trace"]["top_k"]
    splits = list(result["accuracy"])
    fig, axes = plt.subplots(2, len(splits), figsize=(5 * len(splits), 7), squeeze=False)
    for col, split in enumerate(splits):
        acc = result["accuracy"][split]
        names = [n for n in acc if isinstance(acc[n], dict)]
        for name in names:
            lens = sorted(int(l) for l in acc[name])
            axes[0, col].plot(lens, [acc[name][str(l)]["token_topk"] for l in lens], "o-", label=name)
            axes[1, col].plot(lens, [acc[name][str(l)]["batch_match"] for l in lens], "o-", label=name)
        axes[0, col].set_title(f"split {split} (fit {acc['fit_tokens']}, test {acc['test_tokens']} tokens)", fontsize=9)
        axes[0, col].set_ylabel(f"token: estimated top-{k} set = real")
        axes[1, col].set_ylabel(f"batch: estimated top-{2 * k} = real")
        axes[1, col].set_xlabel("path length l (0 = layer marginal)")
        axes[0, col].legend(fontsize=8)
    fig.suptitle(f"Estimator accuracy vs path length — {source}")
    fig.tight_layout()
    written.append(out_dir / "accuracy_vs_path_len.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    if result.get("balance"):
        keys = list(result["balance"])
        policies = list(result["balance"][keys[0]]["mean"])
        fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(keys)), 4))
        width = 0.8 / len(policies)
        for i, policy in enumerate(policies):
            means = [result["balance"][key]["mean"][policy] for key in keys]
            p95 = [result["balance"][key]["p95"][policy] for key in keys]
            pos = np.arange(len(keys)) + i * width
            ax.bar(pos, means, width, label=policy)
            ax.scatter(pos, p95, color="black", marker="_", s=80)
        ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2)
        ax.set_xticklabels(keys, fontsize=8)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel("busiest device / mean load\n(bar: mean, tick: p95)")
        ax.set_title(f"Placement balance on held-out batches of {result['batch_tokens']} tokens")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "placement_balance.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written

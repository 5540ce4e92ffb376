"""Peers: other frameworks' real implementations, run beside lina's policies in ``lina bench train``.

A peer trains its own copy of the benchmark model (same shape, initial weights, data, seed and
tokens per rank) with its own engine, inside the benchmark's worker processes: every round runs
lina's policies in turn on lina's model, then each peer for the same number of measured steps
(see :mod:`lina.bench.train_worker`). Its spans go to the same timeline, so its rows are measured
by the same code. Peers: ``deepspeed-zero0`` and ``deepspeed-zero2``
(:mod:`lina.bench.peers.deepspeed_peer`), which need the optional ``deepspeed`` package
(``pip install 'lina[peers]'``).
"""

from __future__ import annotations

import os
import subprocess
import sys

from lina.errors import ConfigError

PEER_NAMES = ("deepspeed-zero0", "deepspeed-zero2")


def deepspeed_import_problem() -> str | None:
    """None when ``deepspeed`` imports here (in a child process, on the CPU accelerator when no
    GPU is present, as the workers import it), else why not (its last line of error)."""
    code = "import torch, os\nif not torch.cuda.is_available(): os.environ['DS_ACCELERATOR'] = 'cpu'\nimport deepspeed"
    try:
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=dict(os.environ)
        )
    except subprocess.TimeoutExpired:
        return "importing deepspeed took more than 300 s"
    if res.returncode == 0:
        return None
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {res.returncode}"


def resolve_peers(text: str | None) -> tuple[list[str], str | None]:
    """``--peers`` -> (peer names, a line to print or None).

    None (the default): every peer when ``deepspeed`` imports, none otherwise (the line says why);
    ``none``: no peers; a comma list: those peers, which must exist and whose package must import.
    Raises ConfigError (before any process starts) for an unknown name or a missing package.
    """
    if text is None:
        problem = deepspeed_import_problem()
        if problem is None:
            return list(PEER_NAMES), None
        return [], (
            f"peers: none (deepspeed does not import: {problem}; "
            "pip install 'lina[peers]' to add the real DeepSpeed-MoE rows)"
        )
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"] or not names:
        return [], None
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown:
        raise ConfigError(
            "peers", f"unknown peer {', '.join(unknown)}", f"use a comma list of {', '.join(PEER_NAMES)}, or none"
        )
    if len(set(names)) != len(names):
        raise ConfigError("peers", f"{text!r} names a peer twice", "name each peer once")
    problem = deepspeed_import_problem()
    if problem is not None:
        raise ConfigError(
            "peers",
            f"{', '.join(names)} need the deepspeed package, which does not import ({problem})",
            "pip install 'lina[peers]', or pass --peers none",
        )
    return names, None


def start_peers(names: list[str], cfg, corpus, timeline, bucket_elements: int | None) -> list:
    """Build the named peers on this rank (collective: every rank calls it with the same names).

    Args:
        cfg: the :class:`lina.config.TrainConfig` lina's trainer runs (model shape, batch, seed,
            optimizer settings).
        corpus: the same corpus.
        timeline: lina's timeline on this rank; the peers' spans go there too.
        bucket_elements: gradient bucket size for engines that take one (ZeRO-2).
    """
    if not names:
        return []
    from lina.bench.peers.deepspeed_peer import DeepSpeedPeer

    return [DeepSpeedPeer(name, cfg, corpus, timeline, bucket_elements=bucket_elements) for name in names]

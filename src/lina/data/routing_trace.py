"""Routing traces: which experts every token chose at every MoE layer.

A :class:`RoutingTrace` is the input of Lina's popularity estimators (fitted offline on one
trace, measured on another) and of the cluster simulator. It holds, for ``T`` tokens of a
model with ``L`` MoE layers, ``E`` experts and top-``k`` gating:

==============  ============  ==========================================================
field           shape/dtype   meaning
==============  ============  ==========================================================
``experts``     [T, L, k]     experts chosen per token per layer, highest gate prob first
                int16
``gate_probs``  [T, L, k]     their gate weights (``None`` when not recorded)
                float32
``seq_id``      [T] int32     the sequence (request / problem) the token belongs to
``token_idx``   [T] int32     the token's position inside its sequence
``num_experts`` int           ``E``; every entry of ``experts`` is in ``[0, E)``
``top_k``       int           ``k``
``source``      str           where the trace came from (free text)
==============  ============  ==========================================================

Arrays are kept as numpy (compact: int16 experts); :meth:`RoutingTrace.expert_tensor`
gives the ``torch.long`` view that tensor code indexes with.

On disk (``.npz``, written with :func:`numpy.savez_compressed`, read with
``allow_pickle=False``): arrays ``experts``, ``seq_id``, ``token_idx``, optionally
``gate_probs``, and ``meta``: a 0-d unicode array holding JSON
``{"format": "lina-routing-trace", "version": 1, "num_experts": E, "top_k": k,
"source": ...}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lina.errors import ConfigError, LinaError
from lina.npz_io import read_npz, write_npz

TRACE_FORMAT = "lina-routing-trace"
TRACE_VERSION = 1
MIXTRAL_SOURCE_HINT = (
    "it is ../shared/data/mixtral-8x7b-gsm8k-routing.jsonl beside the checkout; the public original is "
    "routing_data_collected/gsm8k_2_routing.jsonl in the history of the GitHub repository "
    "Mario928/speculative-moe"
)


def _as_numpy(value, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(value), dtype=dtype)


@dataclass
class RoutingTrace:
    """Expert choices of ``T`` tokens at ``L`` MoE layers (see the module docstring).

    Accepts numpy arrays, torch tensors or nested lists and stores numpy arrays of the
    documented dtypes. Validated on construction (:class:`ConfigError` names the field).
    """

    experts: np.ndarray
    seq_id: np.ndarray
    token_idx: np.ndarray
    num_experts: int
    top_k: int
    gate_probs: np.ndarray | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.num_experts, (int, np.integer)) or not 1 <= int(self.num_experts) <= 32767:
            raise ConfigError(
                "num_experts", f"got {self.num_experts!r}", "give the number of experts per layer, 1..32767"
            )
        self.num_experts = int(self.num_experts)
        self.experts = _as_numpy(self.experts, np.int16)
        if self.experts.ndim != 3:
            raise ConfigError(
                "experts", f"has shape {tuple(self.experts.shape)}", "give a [T, L, k] array of expert ids"
            )
        t, _, k = self.experts.shape
        if not isinstance(self.top_k, (int, np.integer)) or int(self.top_k) != k:
            raise ConfigError("top_k", f"is {self.top_k!r} but experts has k={k}", "set top_k to experts.shape[2]")
        self.top_k = int(self.top_k)
        if t and (self.experts.min() < 0 or self.experts.max() >= self.num_experts):
            raise ConfigError(
                "experts",
                f"holds ids in [{self.experts.min()}, {self.experts.max()}] outside [0, {self.num_experts})",
                "check num_experts or the recorded ids",
            )
        if k > 1 and t:
            srt = np.sort(self.experts, axis=2)
            if (srt[..., 1:] == srt[..., :-1]).any():
                raise ConfigError(
                    "experts", "a token picks the same expert twice in one layer", "record distinct top-k experts"
                )
        self.seq_id = _as_numpy(self.seq_id, np.int32)
        self.token_idx = _as_numpy(self.token_idx, np.int32)
        for name in ("seq_id", "token_idx"):
            arr = getattr(self, name)
            if arr.shape != (t,):
                raise ConfigError(name, f"has shape {tuple(arr.shape)}", f"give one entry per token, shape ({t},)")
        if self.gate_probs is not None:
            self.gate_probs = _as_numpy(self.gate_probs, np.float32)
            if self.gate_probs.shape != self.experts.shape:
                raise ConfigError(
                    "gate_probs",
                    f"has shape {tuple(self.gate_probs.shape)}, experts {tuple(self.experts.shape)}",
                    "give one gate weight per chosen expert, or None",
                )
        self.source = str(self.source)

    # ----------------------------------------------------------------- shape helpers
    @property
    def num_tokens(self) -> int:
        """``T``."""
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        """``L``."""
        return int(self.experts.shape[1])

    def expert_tensor(self) -> torch.Tensor:
        """The expert choices as ``torch.long`` ``[T, L, k]`` (a copy)."""
        return torch.from_numpy(self.experts.astype(np.int64))

    def top1(self) -> torch.Tensor:
        """Top-1 expert per token per layer, ``torch.long`` ``[T, L]``."""
        return torch.from_numpy(self.experts[:, :, 0].astype(np.int64))

    def slot_counts(self) -> torch.Tensor:
        """Token-slots per expert per layer (every one of the k picks counts), ``[L, E]`` float."""
        ex = self.expert_tensor()
        out = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        for layer in range(self.num_layers):
            out[layer] = torch.bincount(ex[:, layer].reshape(-1), minlength=self.num_experts).double()
        return out

    def subset(self, index: np.ndarray) -> RoutingTrace:
        """The tokens selected by ``index`` (boolean mask ``[T]`` or integer indices), same metadata."""
        index = np.asarray(index)
        return RoutingTrace(
            experts=self.experts[index],
            seq_id=self.seq_id[index],
            token_idx=self.token_idx[index],
            num_experts=self.num_experts,
            top_k=self.top_k,
            gate_probs=None if self.gate_probs is None else self.gate_probs[index],
            source=self.source,
        )

    def in_order(self) -> RoutingTrace:
        """Tokens sorted by (sequence, position): the order a decoder would produce them."""
        order = np.lexsort((self.token_idx, self.seq_id))
        return self.subset(order)

    def split(self, frac: float, by: str = "seq") -> tuple[RoutingTrace, RoutingTrace]:
        """Split into (fit, held-out) parts.

        Args:
            frac: share that goes to the fit part, in (0, 1).
            by: ``"seq"``: the first ``round(frac * S)`` sequences (by id, at least one and
                at most S-1) go to fit, the rest are held out, so no held-out sequence was
                seen; ``"position"``: the first ``frac`` of every sequence's tokens (by
                position) go to fit, the rest are held out.
        Returns:
            ``(fit, held_out)``, each in (sequence, position) order.
        """
        if not 0.0 < frac < 1.0:
            raise ConfigError("frac", f"is {frac}", "give a fraction strictly between 0 and 1, e.g. 0.7")
        ordered = self.in_order()
        if by == "seq":
            seqs = np.unique(ordered.seq_id)
            if len(seqs) < 2:
                raise ConfigError(
                    "by", f"'seq' needs at least 2 sequences, the trace has {len(seqs)}", "use by='position'"
                )
            n_fit = min(max(int(round(frac * len(seqs))), 1), len(seqs) - 1)
            mask = np.isin(ordered.seq_id, seqs[:n_fit])
        elif by == "position":
            mask = np.zeros(ordered.num_tokens, dtype=bool)
            for s in np.unique(ordered.seq_id):
                idx = np.flatnonzero(ordered.seq_id == s)
                n_fit = int(np.floor(frac * len(idx)))
                mask[idx[:n_fit]] = True
        else:
            raise ConfigError("by", f"is {by!r}", "use 'seq' or 'position'")
        return ordered.subset(mask), ordered.subset(~mask)

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write the trace as a compressed ``.npz`` (no pickle). Returns the path written."""
        meta = {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "source": self.source,
        }
        arrays = {"experts": self.experts, "seq_id": self.seq_id, "token_idx": self.token_idx}
        if self.gate_probs is not None:
            arrays["gate_probs"] = self.gate_probs
        return write_npz(path, meta, arrays, "routing trace")

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        """Read a trace written by :meth:`save`."""
        meta, data = read_npz(path, "routing trace")
        if meta.get("format") != TRACE_FORMAT:
            raise LinaError(f"{path} is not a lina routing trace (format {meta.get('format')!r})")
        if int(meta.get("version", 0)) > TRACE_VERSION:
            raise LinaError(f"{path} has trace format version {meta['version']}; this lina reads up to {TRACE_VERSION}")
        try:
            return cls(
                experts=data["experts"],
                seq_id=data["seq_id"],
                token_idx=data["token_idx"],
                num_experts=int(meta["num_experts"]),
                top_k=int(meta["top_k"]),
                gate_probs=data.get("gate_probs"),
                source=meta.get("source", ""),
            )
        except KeyError as err:
            raise LinaError(f"cannot read routing trace {path}: missing {err}") from err


def read_mixtral_jsonl(path: str | Path, num_experts: int | None = None) -> RoutingTrace:
    """Read a vLLM routing log (one JSON object per (token, layer)) into a trace.

    Each line looks like ``{"problem_id": 0, "token_idx": 3, "layer": 5, "experts": [7, 0],
    "gating_probs": [0.8, 0.2], ...}``. ``problem_id`` becomes ``seq_id``. Only tokens with
    a record at every layer ``0..L-1`` are kept (``L`` = 1 + largest layer seen), in
    (problem, position) order.

    Args:
        path: the ``.jsonl`` file, e.g. ``../shared/data/mixtral-8x7b-gsm8k-routing.jsonl``.
        num_experts: ``E``; default 1 + the largest expert id seen.
    Raises:
        LinaError: the file is absent (the message says where to get it) or a line is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise LinaError(f"routing log {path} not found; {MIXTRAL_SOURCE_HINT}")
    records: dict[tuple[int, int], dict[int, tuple[list[int], list[float]]]] = {}
    top_k = None
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = (int(rec["problem_id"]), int(rec["token_idx"]))
                layer = int(rec["layer"])
                experts = [int(e) for e in rec["experts"]]
                probs = [float(p) for p in rec.get("gating_probs", [float("nan")] * len(experts))]
            except (ValueError, KeyError, TypeError) as err:
                raise LinaError(f"{path}:{lineno}: not a routing record ({err})") from err
            if top_k is None:
                top_k = len(experts)
            if len(experts) != top_k or len(probs) != top_k or layer < 0:
                raise LinaError(f"{path}:{lineno}: expected {top_k} experts and gate probs at a layer >= 0")
            records.setdefault(key, {})[layer] = (experts, probs)
    if not records:
        raise LinaError(f"{path} holds no routing records")
    num_layers = 1 + max(max(layers) for layers in records.values())
    keys = sorted(k for k, layers in records.items() if len(layers) == num_layers)
    if not keys:
        raise LinaError(f"{path}: no token has a record at all {num_layers} layers")
    experts = np.array([[records[k][layer][0] for layer in range(num_layers)] for k in keys], dtype=np.int64)
    probs = np.array([[records[k][layer][1] for layer in range(num_layers)] for k in keys], dtype=np.float32)
    if num_experts is None:
        num_experts = int(experts.max()) + 1
    return RoutingTrace(
        experts=experts,
        seq_id=np.array([k[0] for k in keys]),
        token_idx=np.array([k[1] for k in keys]),
        num_experts=num_experts,
        top_k=int(top_k),
        gate_probs=None if np.isnan(probs).any() else probs,
        source=f"vllm-jsonl:{path.name}",
    )


def load_trace(path: str | Path) -> RoutingTrace:
    """Load a trace by file suffix: ``.npz`` (:meth:`RoutingTrace.load`) or ``.jsonl`` (:func:`read_mixtral_jsonl`)."""
    path = Path(path)
    if path.suffix == ".npz":
        return RoutingTrace.load(path)
    if path.suffix == ".jsonl":
        return read_mixtral_jsonl(path)
    raise ConfigError(
        "trace", f"{path} has suffix {path.suffix!r}", "give a .npz routing trace or a .jsonl vLLM routing log"
    )


def synthetic_trace(
    num_tokens: int,
    num_layers: int,
    num_experts: int,
    top_k: int = 1,
    affinity: float = 0.7,
    skew: float = 1.0,
    tokens_per_seq: int = 64,
    seed: int = 0,
) -> RoutingTrace:
    """A random trace with the two properties Lina exploits, for tests and simulations.

    Each layer has a Zipf-like popularity (exponent ``skew``, shuffled per layer), and a
    random "successor" map: with probability ``affinity`` a token's top-1 expert at layer
    i+1 is the successor of its top-1 at layer i; otherwise it is drawn from the layer's
    popularity. The other ``k-1`` experts are drawn from the popularity without repeats.

    Returns:
        a trace with ``experts`` [num_tokens, num_layers, top_k], source ``"synthetic"``.
    """
    if top_k > num_experts:
        raise ConfigError("top_k", f"{top_k} exceeds num_experts {num_experts}", "use top_k <= num_experts")
    if not 0.0 <= affinity <= 1.0:
        raise ConfigError("affinity", f"is {affinity}", "give a probability in [0, 1]")
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, num_experts + 1, dtype=np.float64)
    experts = np.zeros((num_tokens, num_layers, top_k), dtype=np.int64)
    prev = None
    for layer in range(num_layers):
        pop = ranks**-skew
        pop = rng.permutation(pop / pop.sum())
        successor = rng.integers(0, num_experts, size=num_experts)
        # Gumbel top-k without replacement from the popularity, per token.
        keys = np.log(pop)[None, :] - np.log(-np.log(rng.random((num_tokens, num_experts))))
        if prev is not None:
            follow = rng.random(num_tokens) < affinity
            keys[follow, successor[prev[follow]]] = np.inf
        choice = np.argsort(-keys, axis=1)[:, :top_k]
        experts[:, layer] = choice
        prev = choice[:, 0]
    seq_id = np.arange(num_tokens) // max(tokens_per_seq, 1)
    token_idx = np.arange(num_tokens) % max(tokens_per_seq, 1)
    return RoutingTrace(
        experts=experts, seq_id=seq_id, token_idx=token_idx, num_experts=num_experts, top_k=top_k, source="synthetic"
    )

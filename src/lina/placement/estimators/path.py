"""Lina's path estimator: next-layer experts by the path a token took through earlier layers.

The *path* of a token before layer ``j`` is its top-1 expert at layers ``j-l .. j-1``
(``l = path_len``). We key paths by the top-1 expert per layer, as the paper does for its
top-1 models; for top-k models the *target* still counts all k experts chosen at layer
``j`` (each is one token-slot), so the stored distribution is the share of layer ``j``'s
token-slots that each expert got from tokens of that path.

Prediction for a path never seen in the fitted trace backs off to the last ``l-1``
layers, then ``l-2``, ... down to the layer's marginal popularity (and uniform if the
layer was never seen). With ``smoothing = alpha > 0`` (our addition, a Dirichlet /
Witten-Bell style interpolation for sparse traces) every level is mixed with the one
below: ``p_m = (counts_m + alpha * p_{m-1}) / (n_m + alpha)``, so a path seen once does
not override everything known about shorter paths. ``smoothing = 0`` is the paper's
lookup.
"""

from __future__ import annotations

import numpy as np
import torch

from lina.data.routing_trace import RoutingTrace
from lina.errors import ConfigError
from lina.placement.estimators.base import PopularityEstimator, as_history


def encode_paths(cols: np.ndarray, num_experts: int) -> np.ndarray:
    """Path ``[T, m]`` of expert ids -> one int64 key per token ``[T]`` (base-E digits)."""
    keys = np.zeros(cols.shape[0], dtype=np.int64)
    for c in range(cols.shape[1]):
        keys = keys * num_experts + cols[:, c]
    return keys


def count_targets(keys: np.ndarray, targets: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-slot counts per distinct key.

    Args:
        keys: ``int64[T]`` path keys.
        targets: ``int[T, k]`` experts chosen at the predicted layer.
    Returns:
        ``(unique_keys int64[P] sorted, counts float64[P, E])``.
    """
    uniq, inv = np.unique(keys, return_inverse=True)
    counts = np.zeros((len(uniq), num_experts), dtype=np.float64)
    k = targets.shape[1]
    np.add.at(counts, (np.repeat(inv, k), targets.reshape(-1)), 1.0)
    return uniq, counts


class PathEstimator(PopularityEstimator):
    """Lookup table from (layer, path of the last ``path_len`` top-1 experts) to next-layer expert shares.

    Args:
        path_len: ``l``, layers of history in a path (paper default 3).
        smoothing: ``alpha`` >= 0; 0 is the paper's back-off lookup (see module docstring).
        min_count: with ``smoothing = 0``, a path needs this many token-slots to be used
            instead of a shorter one.
    """

    kind = "path"

    def __init__(self, path_len: int = 3, smoothing: float = 0.0, min_count: int = 1):
        if path_len < 0:
            raise ConfigError("path_len", f"is {path_len}", "give 0 (marginal only) or more layers")
        if smoothing < 0:
            raise ConfigError("smoothing", f"is {smoothing}", "give 0 (paper's lookup) or a positive pseudo-count")
        if min_count < 1:
            raise ConfigError("min_count", f"is {min_count}", "give 1 or more")
        self.path_len = path_len
        self.smoothing = float(smoothing)
        self.min_count = min_count
        # _tables[layer][m] = (keys int64[P] sorted, counts float64[P, E]) for paths of m layers.
        self._tables: list[list[tuple[np.ndarray, np.ndarray]]] = []

    def _check_key_range(self) -> None:
        if self.num_experts ** max(self.path_len, 1) >= 2**62:
            raise ConfigError(
                "path_len", f"{self.path_len} with {self.num_experts} experts overflows path keys", "use a shorter path"
            )

    def fit(self, trace: RoutingTrace) -> PathEstimator:
        """Count, for every layer and path length 0..l, the next-layer token-slots of each path."""
        self.num_experts, self.num_layers, self.top_k = trace.num_experts, trace.num_layers, trace.top_k
        self._check_key_range()
        experts = trace.experts.astype(np.int64)
        top1 = experts[:, :, 0]
        self._tables = []
        for layer in range(self.num_layers):
            per_len = []
            for m in range(min(self.path_len, layer) + 1):
                keys = encode_paths(top1[:, layer - m : layer], self.num_experts)
                per_len.append(count_targets(keys, experts[:, layer], self.num_experts))
            self._tables.append(per_len)
        return self

    def _lookup(self, layer: int, m: int, keys: np.ndarray) -> np.ndarray:
        """Counts ``float64[T, E]`` of each key's row in the (layer, m) table; zeros if unseen."""
        table_keys, table_counts = self._tables[layer][m]
        out = np.zeros((len(keys), self.num_experts), dtype=np.float64)
        if len(table_keys) == 0:
            return out
        pos = np.minimum(np.searchsorted(table_keys, keys), len(table_keys) - 1)
        found = table_keys[pos] == keys
        out[found] = table_counts[pos[found]]
        return out

    def predict(self, layer: int, history: torch.Tensor) -> torch.Tensor:
        """``FloatTensor[T, E]`` distribution over layer ``layer``'s experts per token (see module docstring)."""
        self._check_layer(layer)
        top1 = as_history(history, self.num_experts)[:, :, 0].numpy()
        tokens, depth = top1.shape
        probs = np.full((tokens, self.num_experts), 1.0 / self.num_experts)
        for m in range(min(self.path_len, layer, depth) + 1):
            counts = self._lookup(layer, m, encode_paths(top1[:, depth - m :], self.num_experts))
            total = counts.sum(axis=1)
            if self.smoothing > 0:
                probs = (counts + self.smoothing * probs) / (total + self.smoothing)[:, None]
            else:
                use = total >= self.min_count
                probs[use] = counts[use] / total[use, None]
        return torch.from_numpy(probs).float()

    def coverage(self, layer: int, history: torch.Tensor) -> torch.Tensor:
        """Longest path length found in the table per token, ``LongTensor[T]`` (0 = marginal only)."""
        self._check_layer(layer)
        top1 = as_history(history, self.num_experts)[:, :, 0].numpy()
        tokens, depth = top1.shape
        best = np.zeros(tokens, dtype=np.int64)
        for m in range(1, min(self.path_len, layer, depth) + 1):
            total = self._lookup(layer, m, encode_paths(top1[:, depth - m :], self.num_experts)).sum(axis=1)
            best[total >= self.min_count] = m
        return torch.from_numpy(best)

    # ------------------------------------------------------------------ persistence
    def _settings(self) -> dict:
        return {"path_len": self.path_len, "smoothing": self.smoothing, "min_count": self.min_count}

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta = {**self._settings(), "num_experts": self.num_experts, "num_layers": self.num_layers, "top_k": self.top_k}
        arrays = {}
        for layer, per_len in enumerate(self._tables):
            for m, (keys, counts) in enumerate(per_len):
                arrays[f"keys_{layer}_{m}"] = keys
                arrays[f"counts_{layer}_{m}"] = counts
        return meta, arrays

    @classmethod
    def _from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> PathEstimator:
        settings = {k: meta[k] for k in ("path_len", "smoothing", "min_count")}
        extra = {k: meta[k] for k in getattr(cls, "extra_settings", ()) if k in meta}
        est = cls(**settings, **extra)
        est.num_experts, est.num_layers, est.top_k = (
            int(meta["num_experts"]),
            int(meta["num_layers"]),
            int(meta["top_k"]),
        )
        est._tables = [
            [
                (arrays[f"keys_{layer}_{m}"].astype(np.int64), arrays[f"counts_{layer}_{m}"].astype(np.float64))
                for m in range(min(est.path_len, layer) + 1)
            ]
            for layer in range(est.num_layers)
        ]
        return est

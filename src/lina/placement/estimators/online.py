"""A path estimator that keeps learning while it serves (beyond the paper, which profiles once).

After the real gate of a layer has run for a batch, :meth:`OnlinePathEstimator.update`
adds the batch's (path -> chosen experts) counts to the tables, after multiplying every
count of that layer by ``decay``. The offline profile is the starting point and fades
with the same decay, so the tables follow the requests being served (their prompts,
their language, the model's current phase of decoding) instead of the profile's.
"""

from __future__ import annotations

import numpy as np
import torch

from lina.errors import ConfigError
from lina.placement.estimators.base import as_history
from lina.placement.estimators.path import PathEstimator, count_targets, encode_paths


class OnlinePathEstimator(PathEstimator):
    """:class:`PathEstimator` with decayed online updates.

    Args:
        path_len, smoothing, min_count: as :class:`PathEstimator`.
        decay: factor in (0, 1] applied to a layer's counts before each update; 1 keeps
            everything (a growing profile), smaller forgets faster.
    """

    kind = "online-path"
    extra_settings = ("decay",)

    def __init__(self, path_len: int = 3, smoothing: float = 0.0, min_count: int = 1, decay: float = 0.9):
        super().__init__(path_len=path_len, smoothing=smoothing, min_count=min_count)
        if not 0.0 < decay <= 1.0:
            raise ConfigError("decay", f"is {decay}", "give a factor in (0, 1], e.g. 0.9")
        self.decay = float(decay)
        self.updates = 0

    @classmethod
    def from_offline(cls, offline: PathEstimator, decay: float = 0.9) -> OnlinePathEstimator:
        """Start from a fitted offline profile (its tables are copied, not shared)."""
        if not offline.fitted:
            raise ConfigError("offline", "is not fitted", "fit or load the offline PathEstimator first")
        est = cls(offline.path_len, offline.smoothing, offline.min_count, decay)
        est.num_experts, est.num_layers, est.top_k = offline.num_experts, offline.num_layers, offline.top_k
        est._tables = [[(keys.copy(), counts.copy()) for keys, counts in per_len] for per_len in offline._tables]
        return est

    @classmethod
    def empty(
        cls,
        num_experts: int,
        num_layers: int,
        top_k: int,
        path_len: int = 3,
        smoothing: float = 0.0,
        decay: float = 0.9,
    ) -> OnlinePathEstimator:
        """Start with no profile at all (predictions are uniform until the first update)."""
        est = cls(path_len, smoothing, 1, decay)
        est.num_experts, est.num_layers, est.top_k = num_experts, num_layers, top_k
        est._check_key_range()
        empty = (np.zeros(0, dtype=np.int64), np.zeros((0, num_experts)))
        est._tables = [[empty for _ in range(min(path_len, layer) + 1)] for layer in range(num_layers)]
        return est

    def update(self, layer: int, history: torch.Tensor, chosen: torch.Tensor) -> None:
        """Learn from one batch at one layer.

        Args:
            layer: the layer whose gate just ran.
            history: ``[T, h]`` or ``[T, h, k]`` routing at earlier layers (as for predict).
            chosen: ``LongTensor[T, k]`` experts the gate chose at ``layer``.
        """
        self._check_layer(layer)
        top1 = as_history(history, self.num_experts)[:, :, 0].numpy()
        chosen = torch.as_tensor(chosen).long()
        if chosen.dim() != 2 or chosen.shape[0] != top1.shape[0]:
            raise ConfigError("chosen", f"has shape {tuple(chosen.shape)}", f"give [T, k] with T = {top1.shape[0]}")
        targets = chosen.numpy()
        depth = top1.shape[1]
        per_len = self._tables[layer]
        for m in range(len(per_len)):
            keys, counts = per_len[m]
            counts = counts * self.decay
            if m <= depth:
                new_keys, new_counts = count_targets(
                    encode_paths(top1[:, depth - m :], self.num_experts), targets, self.num_experts
                )
                all_keys = np.concatenate([keys, new_keys])
                uniq, inv = np.unique(all_keys, return_inverse=True)
                merged = np.zeros((len(uniq), self.num_experts))
                np.add.at(merged, inv, np.concatenate([counts, new_counts]))
                keys, counts = uniq, merged
            per_len[m] = (keys, counts)
        self.updates += 1

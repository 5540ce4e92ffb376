"""A decode-aware estimator: in decode, the next token of a sequence tends to route like the
previous token at the same layer. It mixes two predictions of a token's experts at layer ``j``:

* the path: a :class:`PathEstimator` on the experts the token chose at earlier layers;
* the previous token: a per-layer transition table, the distribution of layer ``j``'s experts of a
  token given the top-1 expert the previous token of its sequence chose at layer ``j``;

as ``alpha_j * previous + (1 - alpha_j) * path``, with ``alpha_j`` per layer chosen on the fitting
trace (the value with the best top-k recall; 0 when the previous token tells nothing). A token
without a previous one (the first of its sequence) gets the path prediction alone.

It is a :class:`PopularityEstimator` (kind ``decode``): saved and loaded like the others, and
where a caller knows no previous token (``lina``'s phase 1) it predicts as its path estimator.
"""

from __future__ import annotations

import numpy as np
import torch

from lina.data.routing_trace import RoutingTrace
from lina.errors import ConfigError
from lina.placement.estimators.base import PopularityEstimator
from lina.placement.estimators.path import PathEstimator
from lina.placement.metrics import token_topk_recall

ALPHAS = tuple(i / 10 for i in range(11))


def previous_rows(trace: RoutingTrace) -> np.ndarray:
    """int64[T]: the row of each token's predecessor in its sequence (position - 1), -1 if none."""
    order = np.lexsort((trace.token_idx, trace.seq_id))
    seq, pos = trace.seq_id[order], trace.token_idx[order]
    prev = np.full(len(order), -1, dtype=np.int64)
    same = (seq[1:] == seq[:-1]) & (pos[1:] == pos[:-1] + 1)
    prev[order[1:][same]] = order[:-1][same]
    return prev


class DecodeAwareEstimator(PopularityEstimator):
    """Path through earlier layers + the previous token at the same layer.

    Args:
        path: a fitted :class:`PathEstimator` (the path-only estimator it is measured against).

    Attributes:
        transition: FloatTensor[L, E, E], row ``e`` of layer ``j``: the distribution of a token's
            layer-``j`` experts when the previous token's layer-``j`` top-1 was ``e``.
        alpha: FloatTensor[L], the previous token's weight per layer.
    """

    kind = "decode"

    def __init__(self, path: PathEstimator):
        if not path.fitted:
            raise ConfigError("path", "is not fitted", "fit or load the PathEstimator first")
        self.path = path
        self.num_experts = path.num_experts
        self.num_layers = path.num_layers
        self.top_k = path.top_k
        self.transition = torch.zeros(0)
        self.alpha = torch.zeros(0)

    @property
    def path_len(self) -> int:
        """Layers of history the path part uses."""
        return self.path.path_len

    def fit(self, trace: RoutingTrace) -> DecodeAwareEstimator:
        """Count the transitions of ``trace`` and pick each layer's ``alpha`` on it."""
        e, layers = self.num_experts, trace.num_layers
        experts = trace.expert_tensor()  # [T, L, k]
        prev = torch.from_numpy(previous_rows(trace))
        has = prev >= 0
        cur, before = experts[has], experts[prev[has]]
        self.transition = torch.zeros(layers, e, e, dtype=torch.float64)
        for j in range(layers):
            src = before[:, j, 0].repeat_interleave(cur.shape[2])
            self.transition[j].index_put_(
                (src, cur[:, j].reshape(-1)), torch.ones(src.numel(), dtype=torch.float64), accumulate=True
            )
        totals = self.transition.sum(-1, keepdim=True)
        self.transition = torch.where(totals > 0, self.transition / totals.clamp_min(1), 1.0 / e).float()
        self.alpha = torch.zeros(layers)
        for j in range(layers):
            path = self._path(j, cur)
            previous = self.transition[j][before[:, j, 0]]
            recall = [float(token_topk_recall(a * previous + (1 - a) * path, cur[:, j]).mean()) for a in ALPHAS]
            self.alpha[j] = ALPHAS[int(np.argmax(recall))]
        return self

    def _path(self, layer: int, experts: torch.Tensor) -> torch.Tensor:
        lo = max(0, layer - self.path.path_len)
        return self.path.predict(layer, experts[:, lo:layer, 0])

    def predict(self, layer: int, history: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """FloatTensor[T, E] per token.

        Args:
            history: LongTensor[T, h] top-1 experts at earlier layers (oldest first).
            previous: LongTensor[T] the previous token's top-1 expert at ``layer`` (-1: none);
                None: no token has one (the path prediction alone).
        """
        history = torch.as_tensor(history).long()
        if history.dim() == 3:
            history = history[:, :, 0]
        path = self.path.predict(layer, history[:, -self.path.path_len :] if history.shape[1] else history)
        if previous is None or self.alpha.numel() == 0:
            return path
        has = previous >= 0
        out = path.clone()
        if has.any():
            a = float(self.alpha[layer])
            out[has] = a * self.transition[layer][previous[has]] + (1 - a) * path[has]
        return out

    # ------------------------------------------------------------------ persistence
    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        path_meta, path_arrays = self.path._state()
        arrays = {f"path_{name}": a for name, a in path_arrays.items()}
        arrays["transition"] = self.transition.numpy()
        arrays["alpha"] = self.alpha.numpy()
        return {"path": path_meta, "num_experts": self.num_experts, "num_layers": self.num_layers}, arrays

    @classmethod
    def _from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> DecodeAwareEstimator:
        path_arrays = {name[len("path_") :]: a for name, a in arrays.items() if name.startswith("path_")}
        est = cls(PathEstimator._from_state(meta["path"], path_arrays))
        est.transition = torch.from_numpy(np.asarray(arrays["transition"], dtype=np.float32))
        est.alpha = torch.from_numpy(np.asarray(arrays["alpha"], dtype=np.float32))
        return est

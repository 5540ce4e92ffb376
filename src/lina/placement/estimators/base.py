"""What every popularity estimator offers, and how estimators are stored.

An estimator predicts, before the gate of layer ``j`` runs, each token's distribution
over layer ``j``'s experts from the experts the token chose at earlier layers.

``history`` (the input of :meth:`PopularityEstimator.predict`) is the token's past
routing, oldest layer first, the last entry being layer ``j - 1``:

* ``LongTensor[T, h]``: the top-1 expert per layer, or
* ``LongTensor[T, h, k]``: all k chosen experts per layer, highest gate prob first.

Only the last ``path_len`` layers matter; fewer than that (early layers) is allowed.

Storage: one ``.npz`` per estimator (no pickle): named arrays plus ``meta``, a 0-d
unicode array holding JSON ``{"format": "lina-estimator", "kind": ..., ...}``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from lina.data.routing_trace import RoutingTrace
from lina.errors import ConfigError, LinaError
from lina.npz_io import read_npz, write_npz

ESTIMATOR_FORMAT = "lina-estimator"
_KINDS: dict[str, type[PopularityEstimator]] = {}


def as_history(history: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Validate ``history`` and return it as ``LongTensor[T, h, k']`` (k' = 1 for top-1 input)."""
    history = torch.as_tensor(history).long()
    if history.dim() == 2:
        history = history[:, :, None]
    if history.dim() != 3:
        raise ConfigError(
            "history", f"has shape {tuple(history.shape)}", "give [T, h] top-1 or [T, h, k] experts per past layer"
        )
    if history.numel() and (history.min() < 0 or history.max() >= num_experts):
        raise ConfigError("history", f"holds ids outside [0, {num_experts})", "pass expert ids of this model")
    return history


class PopularityEstimator(ABC):
    """Base class: :meth:`fit` on a trace, :meth:`predict` per-token distributions, :meth:`popularity`.

    Subclasses set ``kind`` (the name stored in files) and implement the abstract methods.
    """

    kind: ClassVar[str] = ""
    num_experts: int = 0
    num_layers: int = 0
    top_k: int = 1

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _KINDS[cls.kind] = cls

    # ------------------------------------------------------------------ interface
    @abstractmethod
    def fit(self, trace: RoutingTrace) -> PopularityEstimator:
        """Learn from a routing trace; returns ``self``."""

    @abstractmethod
    def predict(self, layer: int, history: torch.Tensor) -> torch.Tensor:
        """Per-token distribution over layer ``layer``'s experts: ``FloatTensor[T, E]``, rows sum to 1."""

    @property
    def fitted(self) -> bool:
        return self.num_experts > 0

    def _check_layer(self, layer: int) -> None:
        if not self.fitted:
            raise LinaError(f"{type(self).__name__} is not fitted: call fit(trace) or load(path) first")
        if not 0 <= layer < self.num_layers:
            raise ConfigError("layer", f"is {layer}", f"give a MoE layer in [0, {self.num_layers})")

    def popularity(
        self, layer: int, history: torch.Tensor, top_k: int | None = None, mode: str = "topk"
    ) -> torch.Tensor:
        """Estimated token-slots per expert of ``layer`` for a batch: ``Tensor[E]`` (float64).

        ``mode="topk"`` (the paper): each token adds ``k * p`` to each of its k most likely
        experts only, so an expert nobody is likely to pick gets exactly 0.
        ``mode="expected"``: each token adds ``k * p`` to every expert (the expectation
        of the slot counts under the estimate).

        Args:
            layer: the layer about to be gated.
            history: see the module docstring, ``[T, h]`` or ``[T, h, k]``.
            top_k: the model's k (default: the k of the fitted trace).
        """
        probs = self.predict(layer, history).double()
        k = self.top_k if top_k is None else top_k
        slots = probs * k
        if mode == "expected":
            return slots.sum(dim=0)
        if mode != "topk":
            raise ConfigError("mode", f"is {mode!r}", "use 'topk' or 'expected'")
        keep = torch.zeros_like(slots, dtype=torch.bool)
        keep.scatter_(1, torch.topk(probs, min(k, self.num_experts), dim=1).indices, True)
        return (slots * keep).sum(dim=0)

    # ------------------------------------------------------------------ persistence
    @abstractmethod
    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """JSON-able settings and named arrays that :meth:`_from_state` rebuilds the estimator from."""

    @classmethod
    @abstractmethod
    def _from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> PopularityEstimator:
        """Inverse of :meth:`_state`."""

    def save(self, path: str | Path) -> Path:
        """Write the fitted estimator to ``path`` (``.npz``). Returns the path."""
        if not self.fitted:
            raise LinaError(f"{type(self).__name__} is not fitted; nothing to save")
        meta, arrays = self._state()
        return write_npz(path, {"format": ESTIMATOR_FORMAT, "kind": self.kind, **meta}, arrays, "estimator")

    @classmethod
    def load(cls, path: str | Path) -> PopularityEstimator:
        """Read an estimator written by :meth:`save` (any kind when called on the base class)."""
        meta, arrays = read_npz(path, "estimator")
        if meta.get("format") != ESTIMATOR_FORMAT or meta.get("kind") not in _KINDS:
            raise LinaError(
                f"{path} is not a lina estimator (format {meta.get('format')!r}, kind {meta.get('kind')!r})"
            )
        target = _KINDS[meta["kind"]]
        if cls is not PopularityEstimator and not issubclass(target, cls):
            raise LinaError(f"{path} holds a {meta['kind']} estimator, not a {cls.kind}")
        return target._from_state(meta, arrays)


def load_estimator(path: str | Path) -> PopularityEstimator:
    """Load any estimator kind saved with :meth:`PopularityEstimator.save`."""
    return PopularityEstimator.load(path)

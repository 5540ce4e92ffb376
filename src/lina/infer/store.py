"""Expert weights of every MoE layer, kept in host memory on every inference worker, and the
background loading of the experts a device holds for the next layer."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F


class ExpertStore:
    """All experts of L MoE layers.

    Attributes:
        w1: FloatTensor[L, E, d_model, d_ff]; b1: [L, E, d_ff]; w2: [L, E, d_ff, d_model]; b2: [L, E, d_model]
            (GELU experts), or w1: [L, E, d_model, 2 d_ff] (gate then up) and w2 with b1 = b2 = None
            (SwiGLU experts).
    """

    def __init__(self, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None):
        self.w1, self.b1, self.w2, self.b2 = w1, b1, w2, b2
        self.tensors = tuple(t for t in (w1, b1, w2, b2) if t is not None)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-load")
        self._loaded: dict[tuple[int, tuple[int, ...]], Future] = {}
        self._resident: dict[int, Future] = {}  # layer -> the resident experts' weights, by expert

    @property
    def num_layers(self) -> int:
        return self.w1.shape[0]

    @property
    def num_experts(self) -> int:
        return self.w1.shape[1]

    @classmethod
    def random(cls, layers: int, experts: int, d_model: int, d_ff: int, seed: int = 0) -> "ExpertStore":
        g = torch.Generator().manual_seed(seed)
        return cls(
            torch.randn(layers, experts, d_model, d_ff, generator=g) / d_model**0.5,
            torch.zeros(layers, experts, d_ff),
            torch.randn(layers, experts, d_ff, d_model, generator=g) / d_ff**0.5,
            torch.zeros(layers, experts, d_model),
        )

    def _gather(self, layer: int, experts: tuple[int, ...]) -> dict[int, tuple[torch.Tensor, ...]]:
        idx = torch.tensor(experts, dtype=torch.long)
        picked = [t[layer].index_select(0, idx) for t in self.tensors]
        return {e: tuple(t[i] for t in picked) for i, e in enumerate(experts)}

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start loading the weights of ``experts`` of ``layer`` in the background."""
        key = (layer, tuple(sorted(experts)))
        if key not in self._loaded:
            self._loaded[key] = self._pool.submit(self._gather, *key)

    def make_resident(self, layer: int, experts: list[int]) -> None:
        """Start moving the weights of ``experts`` of ``layer`` in the background; they stay
        (across batches) until the next call for that layer, serving every :meth:`load` of a
        subset of them (a decode window's residents)."""
        self._resident[layer] = self._pool.submit(self._gather, layer, tuple(sorted(experts)))

    def load(self, layer: int, experts: list[int]) -> dict[int, tuple[torch.Tensor, ...]]:
        """Weights of ``experts`` of ``layer`` (waits for a prefetch or the resident weights, or
        loads now)."""
        key = (layer, tuple(sorted(experts)))
        fut = self._loaded.pop(key, None)
        if fut is not None:
            return fut.result()
        resident = self._resident.get(layer)
        if resident is not None:
            held = resident.result()
            if all(e in held for e in key[1]):
                return {e: held[e] for e in key[1]}
        return self._gather(*key)

    def forget(self) -> None:
        """Drop prefetched weights that were not used (a re-plan changed the layer's experts)."""
        self._loaded.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def expert_ffn(rows: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One expert on its rows: [n, d] -> [n, d]; GELU for (w1, b1, w2, b2), SwiGLU for (w1, w2)."""
    if len(weights) == 2:
        w1, w2 = weights
        gate, up = (rows @ w1).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w2
    w1, b1, w2, b2 = weights
    return torch.addmm(b2, F.gelu(torch.addmm(b1, rows, w1)), w2)

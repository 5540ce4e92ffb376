"""Routing traces for inference simulation: drifting popularity with inter-layer affinity.

Lina's inference premise (LINA.md): popularity is skewed, differs per layer *and per batch*,
and tokens that chose the same expert at layer i tend to choose the same expert at layer i+1.
:func:`drifting_trace` produces exactly that, as a :class:`lina.data.routing_trace.RoutingTrace`
(the type the real inference engine and estimators use):

- a fixed *successor map* per layer (a property of the model): with probability ``affinity``
  a token's top-1 at layer i+1 is the successor of its top-1 at layer i;
- otherwise the choice is drawn from a popularity vector drawn afresh *per batch and layer*
  from a symmetric Dirichlet of ``concentration`` (lower: more skew);
- layer 0 draws from its own per-batch popularity; the other ``k-1`` experts are drawn from
  the popularity without repeats.

Two traces with the same ``model_seed`` share successor maps (same model) and differ in their
batches (``batch_seed``): fit the estimator on one, simulate on the other.
"""

from __future__ import annotations

import numpy as np

from lina.data.routing_trace import RoutingTrace
from lina.errors import ConfigError


def drifting_trace(
    num_batches: int,
    tokens_per_batch: int,
    num_layers: int,
    num_experts: int,
    top_k: int = 1,
    affinity: float = 0.6,
    concentration: float = 2.0,
    model_seed: int = 0,
    batch_seed: int = 1,
) -> RoutingTrace:
    """A trace of ``num_batches * tokens_per_batch`` tokens; batch ``b`` is ``seq_id == b``.

    Returns:
        :class:`RoutingTrace` with ``experts`` ``[T, L, k]``, ``seq_id`` the batch index.
    """
    if top_k > num_experts:
        raise ConfigError("top_k", f"{top_k} exceeds {num_experts} experts", "use top_k <= experts")
    if not 0.0 <= affinity <= 1.0:
        raise ConfigError("affinity", f"is {affinity}", "give a probability in [0, 1]")
    if concentration <= 0:
        raise ConfigError("concentration", f"is {concentration}", "give a positive Dirichlet concentration")
    model_rng = np.random.default_rng(model_seed)
    successor = model_rng.integers(0, num_experts, size=(num_layers, num_experts))
    rng = np.random.default_rng(batch_seed)
    t = tokens_per_batch
    experts = np.zeros((num_batches * t, num_layers, top_k), dtype=np.int64)
    for b in range(num_batches):
        prev = None
        rows = slice(b * t, (b + 1) * t)
        for layer in range(num_layers):
            pop = rng.dirichlet(np.full(num_experts, concentration))
            keys = np.log(np.maximum(pop, 1e-300))[None, :] - np.log(-np.log(rng.random((t, num_experts))))
            if prev is not None:
                follow = rng.random(t) < affinity
                keys[follow, successor[layer][prev[follow]]] = np.inf
            choice = np.argsort(-keys, axis=1)[:, :top_k]
            experts[rows, layer] = choice
            prev = choice[:, 0]
    seq_id = np.repeat(np.arange(num_batches), t)
    token_idx = np.tile(np.arange(t), num_batches)
    return RoutingTrace(
        experts=experts,
        seq_id=seq_id,
        token_idx=token_idx,
        num_experts=num_experts,
        top_k=top_k,
        source=f"drifting(affinity={affinity}, concentration={concentration}, model_seed={model_seed}, "
        f"batch_seed={batch_seed})",
    )


def batches(trace: RoutingTrace, tokens_per_batch: int) -> list[np.ndarray]:
    """Consecutive token index ranges of ``tokens_per_batch`` tokens (the last partial one dropped)."""
    n = trace.num_tokens // tokens_per_batch
    if n == 0:
        raise ConfigError(
            "tokens_per_device",
            f"a batch needs {tokens_per_batch} tokens but the trace has {trace.num_tokens}",
            "use fewer tokens per device or a longer trace",
        )
    return [np.arange(i * tokens_per_batch, (i + 1) * tokens_per_batch) for i in range(n)]

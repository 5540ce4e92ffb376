"""One serving step replayed on recorded routing: only the MoE layers run, each layer's gate
replaced by the recorded choices, and the expert FFNs computed for real or charged a device's time.
Shared by ``lina bench serve`` and the device-time timings of ``lina generate``."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lina.infer.engine import InferenceEngine, LayerRouting
from lina.infer.store import expert_ffn


def device_time_expert(compute: str, dilation: float):
    """One expert's FFN charged the device's time (its result is meaningless), or None for real."""
    if compute == "real":
        return None
    from lina.devices import device_from
    from lina.devicetime import DeviceTimeMode

    device = device_from(compute)

    def timed(rows: torch.Tensor, weights: tuple) -> torch.Tensor:
        with DeviceTimeMode(device, dilation):
            return expert_ffn(rows, weights)

    return timed


def replay_step(
    engine: InferenceEngine,
    ids: torch.Tensor,
    weights: torch.Tensor,
    h0: torch.Tensor,
    free_counts: torch.Tensor | None = None,
):
    """One engine step on recorded routing: only the MoE layers run (the dense part passes the
    hidden states through), each layer's gate replaced by the recorded choices.

    Args:
        ids: LongTensor[T, L, k] experts of this rank's tokens; weights: FloatTensor[T, L, k].
        h0: FloatTensor[T, d] the hidden states the experts compute on.
        free_counts: FloatTensor[L, E] global counts for the oracle (None: it plans at placement).
    Returns:
        the engine's :class:`BatchStats` (``latency_s``: this rank's step time).
    """
    gate = lambda j, h: LayerRouting(ids[:, j], weights[:, j])  # noqa: E731
    dense = lambda j, h: (h, h)  # noqa: E731
    dist.barrier()
    with torch.no_grad():
        _, stats = engine.run_batch(h0, dense, gate, free_counts)
    return stats

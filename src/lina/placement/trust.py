"""When an estimate earns its use: per layer, a decaying average of how far the phase-1 estimate
and the recent real counts (a decayed mean of past batches' counts) each were from the real
counts that followed.

Phase 1 plans from the estimate only while its recent error is no larger than the recent real
counts' (EPLB's source: the past predicts the present); otherwise it falls back to those
counts. Both errors are measured every batch, whichever source was used, so an estimator that
becomes accurate again (an online one that learned) is trusted again.

The error is the total variation distance between the two popularity distributions:
``0.5 * sum |p / sum(p) - q / sum(q)|`` in [0, 1] (0: same shares).
"""

from __future__ import annotations

import torch

#: the phase-1 sources a layer's plan can come from
ESTIMATE, RECENT_COUNTS, REAL = "estimate", "recent_counts", "real"


def share_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total variation distance between the shares of Tensor[E] ``p`` and ``q`` (0 when both
    are empty)."""
    p, q = p.double(), q.double()
    sp, sq = float(p.sum()), float(q.sum())
    if sp <= 0 and sq <= 0:
        return 0.0
    if sp <= 0 or sq <= 0:
        return 1.0
    return 0.5 * float((p / sp - q / sq).abs().sum())


class EstimateTrust:
    """Per layer, the decayed mean error of the estimate and of the recent real counts.

    Args:
        decay: weight of the past in each average (0: only the latest batch counts).
    """

    def __init__(self, decay: float = 0.7):
        self.decay = decay
        self.estimate_error: dict[int, float] = {}
        self.recent_counts_error: dict[int, float] = {}

    def _mix(self, table: dict[int, float], layer: int, value: float) -> None:
        old = table.get(layer)
        table[layer] = value if old is None else self.decay * old + (1 - self.decay) * value

    def observe(
        self, layer: int, estimate: torch.Tensor | None, recent_counts: torch.Tensor | None, real: torch.Tensor
    ) -> None:
        """Score both sources of ``layer`` against its real counts Tensor[E] (a source that was
        not available is skipped)."""
        if estimate is not None:
            self._mix(self.estimate_error, layer, share_distance(estimate, real))
        if recent_counts is not None:
            self._mix(self.recent_counts_error, layer, share_distance(recent_counts, real))

    def source(self, layer: int, has_recent_counts: bool) -> str:
        """``estimate`` while it is at least as accurate as the recent real counts (or nothing
        else is known), else ``recent_counts``."""
        if not has_recent_counts or layer not in self.recent_counts_error:
            return ESTIMATE
        if self.estimate_error.get(layer, 0.0) <= self.recent_counts_error[layer]:
            return ESTIMATE
        return RECENT_COUNTS

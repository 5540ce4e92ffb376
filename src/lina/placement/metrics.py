"""How good a popularity estimate is, in the two senses Lina uses.

* Token level (paper's estimator accuracy): the estimated top-k experts of a token equal,
  as a set, the k experts its gate really chose.
* Batch level (phase 2's test): the estimated 2k most popular experts of a batch equal the
  real 2k most popular; when they differ, phase 2 re-plans, so ``1 - match`` is the
  re-plan rate.
"""

from __future__ import annotations

import torch


def token_topk_hits(probs: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per token: do the estimated top-k experts equal the real ones (as sets)?

    Args:
        probs: ``FloatTensor[T, E]`` estimated distribution over the layer's experts.
        real: ``LongTensor[T, k]`` experts the gate chose.
    Returns:
        ``BoolTensor[T]``.
    """
    k = real.shape[1]
    est = torch.topk(probs, k, dim=1).indices
    return (torch.sort(est, dim=1).values == torch.sort(real.long(), dim=1).values).all(dim=1)


def token_topk_recall(probs: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per token: the share of the experts the gate chose that are among the estimated top-k
    (1.0 when the sets are equal; the paper's set equality is rare with top-8 of 64).

    Args:
        probs: ``FloatTensor[T, E]``; real: ``LongTensor[T, k]``.
    Returns:
        ``FloatTensor[T]`` in [0, 1].
    """
    k = real.shape[1]
    est = torch.topk(probs, k, dim=1).indices
    return (est.unsqueeze(2) == real.long().unsqueeze(1)).any(dim=1).float().mean(dim=1)


def topset_equal(estimated: torch.Tensor, real: torch.Tensor, n: int) -> bool:
    """Are the ``n`` experts ranked highest by ``estimated`` a top-``n`` set of ``real``?

    Ties in ``real`` are forgiven: the estimated set matches when every expert in it has
    at least the count of every expert outside it.

    Args:
        estimated: ``Tensor[E]`` estimated popularity.
        real: ``Tensor[E]`` real token-slots per expert.
        n: size of the compared list (Lina: ``2k``).
    """
    real = torch.as_tensor(real, dtype=torch.float64)
    n = min(n, real.numel())
    if n == real.numel():
        return True
    chosen = torch.zeros(real.numel(), dtype=torch.bool)
    chosen[torch.topk(torch.as_tensor(estimated, dtype=torch.float64), n).indices] = True
    return bool(real[chosen].min() >= real[~chosen].max())

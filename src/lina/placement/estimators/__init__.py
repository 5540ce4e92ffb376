"""Popularity estimators: predict next-layer expert choices from the path a token took.

* :class:`PathEstimator` — the paper's offline lookup table (with optional smoothing).
* :class:`OnlinePathEstimator` — the same table, updated with decay while serving.
* :class:`LogisticEstimator` — a learned per-layer multinomial logistic regression.
* :class:`DecodeAwareEstimator` — the path mixed with the previous token's expert at the same layer.

All share :class:`PopularityEstimator`'s ``fit / predict / popularity / save / load``.
"""

from lina.placement.estimators.base import PopularityEstimator, as_history, load_estimator
from lina.placement.estimators.decode import DecodeAwareEstimator
from lina.placement.estimators.logistic import LogisticEstimator
from lina.placement.estimators.online import OnlinePathEstimator
from lina.placement.estimators.path import PathEstimator

__all__ = [
    "PopularityEstimator",
    "PathEstimator",
    "OnlinePathEstimator",
    "LogisticEstimator",
    "DecodeAwareEstimator",
    "as_history",
    "load_estimator",
]

"""Placement of experts on devices for inference: pure tensor functions, no I/O besides estimator files.

* :class:`Placement` — ``share[E, N]``, routing of token-slots to replicas, device loads.
* :func:`static_placement` — DeepSpeed's layout (expert e on device e mod N).
* :func:`lina_placement` / :func:`oracle_placement` / :func:`replan_if_needed` — Lina's
  two-phase scheduling (replicate hot experts, pack cold ones).
* :func:`eplb_placement` / :class:`EPLBPlanner` — the EPLB baseline (moving-average load).
* :mod:`lina.placement.estimators` — popularity estimators.
* :func:`token_topk_hits` / :func:`topset_equal` — estimator accuracy measures.
"""

from lina.placement.core import Placement, imbalance, max_device_load
from lina.placement.eplb import EPLBPlanner, default_slots_per_device, eplb_placement
from lina.placement.lina import lina_placement, oracle_placement, replan_if_needed
from lina.placement.metrics import token_topk_hits, topset_equal
from lina.placement.static import static_placement

__all__ = [
    "Placement",
    "imbalance",
    "max_device_load",
    "static_placement",
    "lina_placement",
    "oracle_placement",
    "replan_if_needed",
    "eplb_placement",
    "EPLBPlanner",
    "default_slots_per_device",
    "token_topk_hits",
    "topset_equal",
]

"""Inference placement policies at serving time: ``static``, ``eplb``, ``lina``, ``oracle``.

The engine asks a policy, layer by layer, where each expert's tokens go (a
:class:`lina.placement.Placement`). The placement math lives in :mod:`lina.placement`; here is only
when each policy plans and what it knows:

``static``  expert e on device e mod N (DeepSpeed's layout), never changes.
``eplb``    replicas from a moving average of past batches' load, re-planned every few batches
            (DeepSeek EPLB / vLLM).
``lina``    phase 1: each device estimates the next layer's popularity from its tokens' paths; the
            estimates ride on this layer's dispatch to the coordinator, whose plan returns on the
            combine (devices then load the planned experts' weights in the background). Phase 2,
            after the real gate: if the estimated top-2k experts differ from the real ones, re-plan
            on the real counts (and load weights on the spot).
``oracle``  Lina's placement on the batch's real counts, planned before the batch at no cost.

The engine gives every policy the layer's global real counts: each device's local counts travel
in the dispatch header, an all-to-all the dispatch needs anyway, so phase 2 costs no extra round
trip (the paper's phase 2 blocks on one).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from lina.errors import ConfigError
from lina.placement.core import Placement
from lina.placement.eplb import EPLBPlanner
from lina.placement.estimators.base import PopularityEstimator
from lina.placement.lina import lina_placement, oracle_placement, replan_if_needed
from lina.placement.static import static_placement


@dataclass
class ServingContext:
    """What a serving policy is built from.

    Attributes:
        num_experts: E; num_devices: N; top_k: k; num_layers: MoE layers L.
        estimator: the fitted popularity estimator (``lina`` needs one).
        eplb_window / eplb_replan_every: batches EPLB averages over / re-plans after.
        max_experts_per_device: Lina's packing limit (the paper's 4; raised where E / N needs it).
        popularity_mode: ``expected`` (every expert gets its probability mass) or ``topk`` (the
            paper's: each token's top-k experts only).
    """

    num_experts: int
    num_devices: int
    top_k: int
    num_layers: int
    estimator: PopularityEstimator | None = None
    eplb_window: int = 32
    eplb_replan_every: int = 4
    max_experts_per_device: int = 4
    popularity_mode: str = "expected"


def local_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """LongTensor[T, k] -> float64 Tensor[E] token-slots per expert."""
    return torch.bincount(expert_ids.reshape(-1), minlength=num_experts).double()


class ServingPolicy(abc.ABC):
    """Decides each MoE layer's placement during one batch.

    Args:
        num_experts: E; num_devices: N; top_k: k.
    """

    name = "base"
    uses_phase1 = False
    needs_batch_counts = False

    def __init__(self, num_experts: int, num_devices: int, top_k: int):
        self.num_experts, self.num_devices, self.top_k = num_experts, num_devices, top_k
        self.stats = {"replans": 0, "checked": 0}

    @classmethod
    def create(cls, ctx: ServingContext) -> "ServingPolicy":
        """The policy for ``ctx`` (subclasses that need more than E, N and k override this)."""
        return cls(ctx.num_experts, ctx.num_devices, ctx.top_k)

    def begin_batch(self, free_counts: torch.Tensor | None) -> None:
        """``free_counts``: FloatTensor[L, E] of the batch's real global counts when the engine
        knows them without communication (trace replay); only the oracle may use them."""
        self.free_counts = free_counts

    @abc.abstractmethod
    def placement(self, layer: int, counts: torch.Tensor) -> Placement:
        """Placement of ``layer`` once its gate ran; ``counts``: float64 Tensor[E], the batch's real
        token-slots per expert over all devices."""

    def local_estimate(self, layer: int, history: torch.Tensor) -> torch.Tensor | None:
        """Phase 1 on every device: estimated token-slots per expert of ``layer`` (Tensor[E])."""
        return None

    def coordinate(self, layer: int, estimate_sum: torch.Tensor) -> Placement:
        """Phase 1 on the coordinator: plan ``layer`` from the summed estimates."""
        raise ConfigError("policy", f"{self.name} has no phase 1", "use the lina policy")

    def receive_plan(self, layer: int, placement: Placement, estimate: torch.Tensor) -> None:
        """Phase 1 result reaching every device."""

    def end_batch(self, counts: torch.Tensor) -> None:
        """Global real counts of the batch, FloatTensor[L, E] (only when ``needs_batch_counts``)."""


class StaticPolicy(ServingPolicy):
    name = "static"

    def __init__(self, *args):
        super().__init__(*args)
        self._placement = static_placement(self.num_experts, self.num_devices)

    def placement(self, layer, counts):
        return self._placement


class OraclePolicy(ServingPolicy):
    name = "oracle"

    def __init__(self, *args, max_experts_per_device: int = 4):
        super().__init__(*args)
        self.max_experts_per_device = max_experts_per_device

    @classmethod
    def create(cls, ctx):
        return cls(ctx.num_experts, ctx.num_devices, ctx.top_k, max_experts_per_device=ctx.max_experts_per_device)

    def begin_batch(self, free_counts):
        super().begin_batch(free_counts)
        self._plans = (
            [oracle_placement(c, self.num_devices, self.max_experts_per_device) for c in free_counts]
            if free_counts is not None
            else None
        )

    def placement(self, layer, counts):
        if self._plans is not None:
            return self._plans[layer]
        return oracle_placement(counts, self.num_devices, self.max_experts_per_device)


class EPLBPolicy(ServingPolicy):
    name = "eplb"
    needs_batch_counts = True

    def __init__(self, *args, num_layers: int, window: int = 32, replan_every: int = 4):
        super().__init__(*args)
        self.planners = [
            EPLBPlanner(self.num_experts, self.num_devices, window, replan_every) for _ in range(num_layers)
        ]

    @classmethod
    def create(cls, ctx):
        return cls(
            ctx.num_experts,
            ctx.num_devices,
            ctx.top_k,
            num_layers=ctx.num_layers,
            window=ctx.eplb_window,
            replan_every=ctx.eplb_replan_every,
        )

    def placement(self, layer, counts):
        return self.planners[layer].placement

    def end_batch(self, counts):
        for planner, c in zip(self.planners, counts):
            planner.observe(c)


class LinaPolicy(ServingPolicy):
    name = "lina"
    uses_phase1 = True

    def __init__(
        self, *args, estimator: PopularityEstimator, popularity_mode: str = "expected", max_experts_per_device: int = 4
    ):
        super().__init__(*args)
        self.estimator = estimator
        self.popularity_mode = popularity_mode
        self.max_experts_per_device = max_experts_per_device
        self._plans: dict[int, tuple[Placement, torch.Tensor]] = {}
        self.last_phase1: Placement | None = None  # the latest phase-1 plan placement() checked

    @classmethod
    def create(cls, ctx):
        if ctx.estimator is None:
            raise ConfigError(
                "estimator",
                "the lina policy needs a fitted popularity estimator",
                "fit one from a routing trace (lina analyze trace) and pass it",
            )
        return cls(
            ctx.num_experts,
            ctx.num_devices,
            ctx.top_k,
            estimator=ctx.estimator,
            popularity_mode=ctx.popularity_mode,
            max_experts_per_device=ctx.max_experts_per_device,
        )

    def begin_batch(self, free_counts):
        super().begin_batch(free_counts)
        self._plans = {}

    def local_estimate(self, layer, history):
        if layer >= self.estimator.num_layers or history.shape[1] == 0:
            return None
        h = history[:, -self.estimator.path_len :] if hasattr(self.estimator, "path_len") else history
        # Expected token-slots per expert (every expert gets its probability mass), not the paper's
        # top-k mass only: with top-k mass, tail experts are estimated at 0 and packed four to a
        # device, which overloads that device when they do get tokens.
        return self.estimator.popularity(layer, h, top_k=self.top_k, mode=self.popularity_mode)

    def coordinate(self, layer, estimate_sum):
        return lina_placement(estimate_sum, self.num_devices, self.max_experts_per_device)

    def receive_plan(self, layer, placement, estimate):
        self._plans[layer] = (placement, estimate)

    def placement(self, layer, counts):
        real = counts  # phase 2
        plan = self._plans.pop(layer, None)
        if plan is None:  # no path yet (first layer): plan on the real counts
            self.last_phase1 = None
            return oracle_placement(real, self.num_devices, self.max_experts_per_device)
        planned, estimate = plan
        self.last_phase1 = planned
        placement, replanned = replan_if_needed(planned, estimate, real, self.top_k, self.max_experts_per_device)
        self.stats["checked"] += 1
        self.stats["replans"] += int(replanned)
        return placement


#: name -> policy class; a policy of one's own is one ServingPolicy subclass and one entry
SERVING_POLICIES: dict[str, type[ServingPolicy]] = {}


def register_serving_policy(cls: type[ServingPolicy]) -> type[ServingPolicy]:
    """Add ``cls`` under ``cls.name`` (usable as a class decorator)."""
    SERVING_POLICIES[cls.name] = cls
    return cls


for _cls in (StaticPolicy, EPLBPolicy, LinaPolicy, OraclePolicy):
    register_serving_policy(_cls)


def serving_policy(name: str, ctx: ServingContext) -> ServingPolicy:
    """Build the registered serving policy ``name`` for ``ctx``."""
    try:
        cls = SERVING_POLICIES[name]
    except KeyError:
        raise ConfigError(
            "policy", f"unknown serving policy {name!r}", f"use one of {', '.join(SERVING_POLICIES)}"
        ) from None
    return cls.create(ctx)


def make_serving_policy(
    name: str,
    num_experts: int,
    num_devices: int,
    top_k: int,
    num_layers: int,
    estimator: PopularityEstimator | None = None,
    eplb_replan_every: int = 4,
) -> ServingPolicy:
    """:func:`serving_policy` with the context spelled out."""
    return serving_policy(
        name,
        ServingContext(num_experts, num_devices, top_k, num_layers, estimator, eplb_replan_every=eplb_replan_every),
    )

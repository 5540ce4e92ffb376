"""Inference placement policies at serving time: ``static``, ``eplb``, ``lina``, ``oracle``.

The engine asks a policy, layer by layer, where each expert's tokens go (a
:class:`lina.placement.Placement`). The placement math lives in :mod:`lina.placement`; here is only
when each policy plans and what it knows:

``static``  expert e on device e mod N (DeepSpeed's layout), never changes.
``eplb``    replicas from a moving average of past batches' load, re-planned every few batches
            (DeepSeek EPLB / vLLM).
``lina``    phase 1: each device estimates the next layer's popularity from its tokens' paths; the
            estimates ride on this layer's dispatch to the coordinator, whose plan returns on the
            combine (devices then load the planned experts' weights in the background). The
            coordinator plans from the summed estimate only while the estimate's recent error is
            no larger than the recent real counts' (:mod:`lina.placement.trust`); else it
            plans from those counts, as EPLB does. Phase 2, after the real gate: if the top-2k
            experts of the source used differ from the real ones and re-planning on the real
            counts lowers the busiest device's load by more than ``replan_tolerance``, re-plan
            (and load weights on the spot); otherwise the plan stands and nothing moves.
``oracle``  Lina's placement on the batch's real counts, planned before the batch at no cost.

For decode (``lina generate``, ``lina bench serve``): ``lina-window`` plans each device's resident
experts once per window of steps from the recent real counts; ``lina-window-predict`` from the
decode-aware estimator's forecast, while the trust rule says it beats those counts.
``lina-auto`` serves each batch with lina, static or eplb, whichever gave the lowest step latency
(the slowest rank's, carried by the next batch's dispatch header) on batches of its size, probing
the others now and then: planning where it pays, the static layout where its cost exceeds the
imbalance it removes.

The engine gives every policy the layer's global real counts: each device's local counts travel
in the dispatch header, an all-to-all the dispatch needs anyway, so phase 2 costs no extra round
trip (the paper's phase 2 blocks on one).
"""

from __future__ import annotations

import abc
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from lina.errors import ConfigError
from lina.infer.arm_choice import FastestArm, batch_class
from lina.placement.core import Placement, max_device_load
from lina.placement.eplb import EPLBPlanner, default_slots_per_device
from lina.placement.estimators.base import PopularityEstimator
from lina.placement.lina import lina_placement, oracle_placement, replan_if_needed
from lina.placement.static import static_placement
from lina.placement.trust import ESTIMATE, REAL, RECENT_COUNTS, EstimateTrust
from lina.placement.window import route_among_resident


@dataclass
class ServingContext:
    """What a serving policy is built from.

    Attributes:
        num_experts: E; num_devices: N; top_k: k; num_layers: MoE layers L.
        estimator: the fitted popularity estimator (``lina`` needs one).
        eplb_window / eplb_replan_every: batches EPLB averages over / re-plans after.
        max_experts_per_device: Lina's packing limit (the paper's 4); where more experts than that
            share a device, raised to EPLB's slot budget ``ceil(E / N) + 1`` (see :meth:`packing_cap`).
        popularity_mode: ``expected`` (every expert gets its probability mass) or ``topk`` (the
            paper's: each token's top-k experts only).
        trust_decay: weight of the past in lina's running error of each phase-1 source.
        replan_tolerance: phase 2 keeps a plan whose busiest device carries at most this much
            more (relative) than a re-plan on the real counts would.
        decode_window: batches (decode steps) one ``lina-window`` residency plan serves.
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
    trust_decay: float = 0.7
    replan_tolerance: float = 0.05
    decode_window: int = 8

    def packing_cap(self) -> int:
        """Experts one device may hold under lina and the oracle: the paper's cap, or one spare
        slot beyond the static layout's ``ceil(E / N)`` (EPLB's budget) when that is more: with
        16-64 experts per device the paper's 4 cannot stand, and a plan without a spare slot
        cannot replicate a hot expert."""
        return max(self.max_experts_per_device, default_slots_per_device(self.num_experts, self.num_devices))


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
    #: whether the engine reports each batch's step latency (maximised over ranks) to
    #: :meth:`observe_step_latency`, at the next batch's first layer (it rides on the dispatch header)
    wants_step_latency = False

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
        self.batches = getattr(self, "batches", 0) + 1

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

    def forecast_due(self) -> bool:
        """Whether, after this batch, the engine should collect every device's
        :meth:`local_forecast` (summed over devices, one small allreduce) for :meth:`receive_forecast`."""
        return False

    def local_forecast(self, routing: torch.Tensor) -> torch.Tensor:
        """This device's forecast of the next batches' token-slots per expert, Tensor[L, E], from
        the batch's routing LongTensor[T, L, k] (its tokens' experts at every layer)."""
        raise ConfigError("policy", f"{self.name} makes no forecast", "use lina-window-predict")

    def receive_forecast(self, forecast: torch.Tensor) -> None:
        """The forecast summed over devices, Tensor[L, E] (before :meth:`end_batch`)."""

    def observe_step_latency(self, latency_s: float) -> None:
        """The previous batch's step latency, the same on every rank, reported at this batch's
        first layer before :meth:`placement` (only when ``wants_step_latency``)."""

    def arm_report(self) -> dict | None:
        """Per class of batch size, per arm: batches measured and their mean step latency (ms),
        for a policy that chooses among others (``lina-auto``); None for the rest."""
        return None

    def upcoming_residents(self) -> list[Placement] | None:
        """After ``end_batch``: per layer, the experts each device will hold from the next batch
        on, when they change (the engine moves their weights in the background); else None."""
        return None

    #: where this policy's placements come from (lina reports per layer instead)
    source = "real"

    def source_report(self, num_layers: int) -> list[dict[str, int]]:
        """Per layer, how many batches' placements came from each source (``static``,
        ``history``, ``real``; lina: ``estimate``, ``recent_counts``, ``real``, and ``replanned``
        for those phase 2 re-planned)."""
        batches = getattr(self, "batches", 0)
        return [{self.source: batches} for _ in range(num_layers)]


class StaticPolicy(ServingPolicy):
    name = "static"
    source = "static"

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
        return cls(ctx.num_experts, ctx.num_devices, ctx.top_k, max_experts_per_device=ctx.packing_cap())

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
    source = "history"

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
        self,
        *args,
        estimator: PopularityEstimator,
        popularity_mode: str = "expected",
        max_experts_per_device: int = 4,
        trust_decay: float = 0.7,
        replan_tolerance: float = 0.05,
    ):
        super().__init__(*args)
        self.estimator = estimator
        self.popularity_mode = popularity_mode
        self.max_experts_per_device = max_experts_per_device
        self.replan_tolerance = replan_tolerance
        self.trust = EstimateTrust(trust_decay)
        # layer -> decayed mean of past batches' real counts [E] (EPLB's source: the recent past)
        self.recent_counts: dict[int, torch.Tensor] = {}
        self.sources: dict[int, Counter] = defaultdict(Counter)
        # layer -> (phase-1 plan, the load it was planned from, the summed estimate, its source)
        self._plans: dict[int, tuple[Placement, torch.Tensor, torch.Tensor, str]] = {}
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
            max_experts_per_device=ctx.packing_cap(),
            trust_decay=ctx.trust_decay,
            replan_tolerance=ctx.replan_tolerance,
        )

    def begin_batch(self, free_counts):
        super().begin_batch(free_counts)
        self._plans = {}

    def phase1_source(self, layer: int) -> str:
        """``estimate`` or ``recent_counts``: what phase 1 plans ``layer`` from (the same answer on
        every device, which all see the same real counts and summed estimates)."""
        return self.trust.source(layer, layer in self.recent_counts)

    def local_estimate(self, layer, history):
        if layer >= self.estimator.num_layers or history.shape[1] == 0:
            return None
        h = history[:, -self.estimator.path_len :] if hasattr(self.estimator, "path_len") else history
        # Expected token-slots per expert (every expert gets its probability mass), not the paper's
        # top-k mass only: with top-k mass, tail experts are estimated at 0 and packed four to a
        # device, which overloads that device when they do get tokens.
        return self.estimator.popularity(layer, h, top_k=self.top_k, mode=self.popularity_mode)

    def _phase1_load(self, layer: int, estimate_sum: torch.Tensor) -> tuple[torch.Tensor, str]:
        source = self.phase1_source(layer)
        return (estimate_sum if source == ESTIMATE else self.recent_counts[layer]), source

    def coordinate(self, layer, estimate_sum):
        load, _ = self._phase1_load(layer, estimate_sum)
        return lina_placement(load, self.num_devices, self.max_experts_per_device)

    def receive_plan(self, layer, placement, estimate):
        load, source = self._phase1_load(layer, estimate)
        self._plans[layer] = (placement, load, estimate, source)

    def placement(self, layer, counts):
        real = counts  # phase 2
        plan = self._plans.pop(layer, None)
        if plan is None:  # no path yet (first layer): plan on the real counts
            self.last_phase1 = None
            self.sources[layer][REAL] += 1
            return oracle_placement(real, self.num_devices, self.max_experts_per_device)
        planned, used, estimate, source = plan
        past = self.recent_counts.get(layer)
        self.trust.observe(layer, estimate, past, real)
        mixed = real.double() if past is None else self.trust.decay * past + (1 - self.trust.decay) * real.double()
        self.recent_counts[layer] = mixed
        self.last_phase1 = planned
        placement, replanned = self._phase2(planned, used, real)
        self.stats["checked"] += 1
        self.stats["replans"] += int(replanned)
        self.sources[layer][source] += 1
        self.sources[layer]["replanned"] += int(replanned)
        return placement

    def _phase2(self, planned: Placement, used: torch.Tensor, real: torch.Tensor) -> tuple[Placement, bool]:
        """Re-plan on the real counts only when the top-2k differ and the re-plan lowers the
        busiest device's load by more than the tolerance (else nothing moves)."""
        placement, replanned = replan_if_needed(planned, used, real, self.top_k, self.max_experts_per_device)
        if replanned and max_device_load(planned, real) <= max_device_load(placement, real) * (
            1 + self.replan_tolerance
        ):
            return planned, False
        return placement, replanned

    def source_report(self, num_layers):
        return [{k: v for k, v in sorted(self.sources[layer].items())} for layer in range(num_layers)]


class WindowPolicy(ServingPolicy):
    """``lina-window``: the experts resident on each device are planned once per ``window``
    batches (decode steps) with Lina's rule on a decayed mean of the recent real counts (the
    static layout until the first counts); each batch's tokens are routed among the resident
    replicas only (:func:`lina.placement.window.route_among_resident`). ``stats["moves"]`` counts
    the expert weights that moved onto a device at window boundaries."""

    name = "lina-window"
    needs_batch_counts = True
    source = "window"

    def __init__(self, *args, num_layers: int, window: int = 8, decay: float = 0.7, max_experts_per_device: int = 4):
        super().__init__(*args)
        self.window, self.decay, self.max_experts_per_device = window, decay, max_experts_per_device
        self.recent: list[torch.Tensor | None] = [None] * num_layers
        self.resident = [static_placement(self.num_experts, self.num_devices) for _ in range(num_layers)]
        self.steps = 0
        self.stats["moves"] = 0
        self._pending: list[Placement] | None = None  # the next window's residents
        self._announce = False

    @classmethod
    def create(cls, ctx):
        return cls(
            ctx.num_experts,
            ctx.num_devices,
            ctx.top_k,
            num_layers=ctx.num_layers,
            window=ctx.decode_window,
            decay=ctx.trust_decay,
            max_experts_per_device=ctx.packing_cap(),
        )

    def begin_batch(self, free_counts):
        super().begin_batch(free_counts)
        if self._pending is not None:  # a window starts: its residents were planned (and moved) ahead
            for layer, plan in enumerate(self._pending):
                self.stats["moves"] += int((plan.holds & ~self.resident[layer].holds).sum())
            self.resident, self._pending = self._pending, None
        self.steps += 1

    def placement(self, layer, counts):
        return route_among_resident(self.resident[layer], counts)

    def end_batch(self, counts):
        for layer, c in enumerate(counts):
            old = self.recent[layer]
            c = c.double()
            self.recent[layer] = c if old is None else self.decay * old + (1 - self.decay) * c
        if self.steps % self.window == 0:  # this window's last batch: plan the next one
            self._pending = [lina_placement(r, self.num_devices, self.max_experts_per_device) for r in self.recent]
            self._announce = True

    def upcoming_residents(self):
        if not self._announce:
            return None
        self._announce = False
        return self._pending


class WindowPredictPolicy(WindowPolicy):
    """``lina-window-predict``: ``lina-window`` whose next window's residents are planned from the
    decode-aware estimator's forecast (:class:`lina.placement.estimators.DecodeAwareEstimator`):
    at a window's last step every device predicts, for each of its tokens (in decode, the last
    token of each active sequence), the next token's experts at every layer from this token's
    expert at the same layer and its path through earlier layers (the next token's own path is not
    known yet; it is taken to route like this one). The forecasts, summed over devices (one small
    allreduce per window), are the load Lina's rule plans from, as long as, per layer, the
    forecast's recent error is no larger than the recent real counts' (the trust rule of
    :mod:`lina.placement.trust`, scored against each window's real counts); else that layer plans
    from the recent counts, as ``lina-window`` does. :meth:`source_report` says per layer how many
    windows each source planned."""

    name = "lina-window-predict"

    def __init__(self, *args, estimator, **kwargs):
        super().__init__(*args, **kwargs)
        self.estimator = estimator
        self.trust = EstimateTrust(self.decay)
        self.sources: dict[int, Counter] = defaultdict(Counter)
        self.forecast: torch.Tensor | None = None  # [L, E] summed over devices
        layers = len(self.recent)
        self._window_real = [torch.zeros(self.num_experts, dtype=torch.float64) for _ in range(layers)]
        # per layer: (forecast, recent counts) the window being served could have been planned from
        self._candidates: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * layers

    @classmethod
    def create(cls, ctx):
        from lina.placement.estimators.decode import DecodeAwareEstimator

        if not isinstance(ctx.estimator, DecodeAwareEstimator):
            raise ConfigError(
                "estimator",
                f"lina-window-predict needs a decode-aware estimator, not {type(ctx.estimator).__name__}",
                "fit one with `lina analyze trace FILE --save-estimator OUT.npz --estimator decode` (or let "
                "lina generate fit it on the prompts)",
            )
        return cls(
            ctx.num_experts,
            ctx.num_devices,
            ctx.top_k,
            estimator=ctx.estimator,
            num_layers=ctx.num_layers,
            window=ctx.decode_window,
            decay=ctx.trust_decay,
            max_experts_per_device=ctx.packing_cap(),
        )

    def forecast_due(self):
        return self.steps % self.window == 0

    def local_forecast(self, routing):
        top1 = routing[:, :, 0]
        out = torch.zeros(routing.shape[1], self.num_experts, dtype=torch.float64)
        if routing.shape[0] == 0:
            return out
        for layer in range(min(routing.shape[1], self.estimator.num_layers)):
            probs = self.estimator.predict(layer, top1[:, :layer], top1[:, layer])  # [T, E]
            out[layer] = probs.double().sum(0) * self.top_k
        return out

    def receive_forecast(self, forecast):
        self.forecast = forecast

    def end_batch(self, counts):
        for layer, c in enumerate(counts):
            c = c.double()
            self._window_real[layer] += c
            old = self.recent[layer]
            self.recent[layer] = c if old is None else self.decay * old + (1 - self.decay) * c
        if self.steps % self.window:
            return
        plans = []
        for layer, recent in enumerate(self.recent):
            if self._candidates[layer] is not None:  # score both sources on the window just served
                forecast, past = self._candidates[layer]
                self.trust.observe(layer, forecast, past, self._window_real[layer])
            self._window_real[layer] = torch.zeros(self.num_experts, dtype=torch.float64)
            forecast = None if self.forecast is None else self.forecast[layer]
            usable = forecast is not None and float(forecast.sum()) > 0
            source = self.trust.source(layer, True) if usable else RECENT_COUNTS
            self.sources[layer][source] += 1
            self._candidates[layer] = (forecast, recent.clone()) if usable else None
            load = forecast if source == ESTIMATE else recent
            plans.append(lina_placement(load, self.num_devices, self.max_experts_per_device))
        self.forecast = None
        self._pending, self._announce = plans, True

    def source_report(self, num_layers):
        return [{k: v for k, v in sorted(self.sources[layer].items())} for layer in range(num_layers)]


#: name -> policy class; a policy of one's own is one ServingPolicy subclass and one entry
SERVING_POLICIES: dict[str, type[ServingPolicy]] = {}


def register_serving_policy(cls: type[ServingPolicy]) -> type[ServingPolicy]:
    """Add ``cls`` under ``cls.name`` (usable as a class decorator)."""
    SERVING_POLICIES[cls.name] = cls
    return cls


for _cls in (StaticPolicy, EPLBPolicy, LinaPolicy, OraclePolicy):
    register_serving_policy(_cls)


class AutoPolicy(ServingPolicy):
    """``lina-auto``: Lina's placement, the static layout and EPLB's, each batch served by whichever
    gave the lowest step latency on batches of its size (:class:`lina.infer.arm_choice.FastestArm`),
    so that planning is used where it pays (large prefill batches) and not where its cost exceeds
    the imbalance it removes (small decode steps). Every arm keeps learning from every batch's real
    counts; the one that serves is chosen at the first layer, from the batch's global token count
    and the latencies of past batches (each batch's slowest rank, which the engine carries on the
    next batch's first dispatch header: no extra round trip), so every rank chooses the same.

    Args:
        arms: name -> policy, the preferred first (lina, static, eplb).
        chooser: the :class:`FastestArm` over those names.
    """

    name = "lina-auto"
    uses_phase1 = True
    needs_batch_counts = True
    wants_step_latency = True

    def __init__(self, arms: dict[str, ServingPolicy], chooser: FastestArm):
        first = next(iter(arms.values()))
        super().__init__(first.num_experts, first.num_devices, first.top_k)
        self.arms, self.chooser = arms, chooser
        self.stats = arms["lina"].stats  # phase 2's checks and re-plans
        self.served: Counter = Counter()
        self.active: str | None = None  # the arm serving this batch, once its first layer is gated
        self._class = 0
        self._last: tuple[int, str] | None = None  # (class, arm) of the batch whose latency is due

    @classmethod
    def create(cls, ctx):
        arms = {"lina": LinaPolicy.create(ctx), "static": StaticPolicy.create(ctx), "eplb": EPLBPolicy.create(ctx)}
        return cls(arms, FastestArm(tuple(arms)))

    def begin_batch(self, free_counts):
        super().begin_batch(free_counts)
        for arm in self.arms.values():
            arm.begin_batch(free_counts)
        self.active = None

    def local_estimate(self, layer, history):
        # The first layer's phase 1 (for layer 1) runs before this batch's arm is chosen: it runs
        # when the arm chosen for the previous batch's class is lina (steps of one class follow
        # each other in decode). Where that guess is wrong, lina plans layer 1 on its real counts.
        serving = self.active if self.active is not None else self.chooser.choose(self._class)
        return self.arms["lina"].local_estimate(layer, history) if serving == "lina" else None

    def coordinate(self, layer, estimate_sum):
        return self.arms["lina"].coordinate(layer, estimate_sum)

    def receive_plan(self, layer, placement, estimate):
        self.arms["lina"].receive_plan(layer, placement, estimate)

    def placement(self, layer, counts):
        if self.active is None:
            self._class = batch_class(float(counts.sum()) / self.top_k)
            self.active = self.chooser.choose(self._class)
            self.served[self.active] += 1
            self._last = (self._class, self.active)
        return self.arms[self.active].placement(layer, counts)

    def end_batch(self, counts):
        for arm in self.arms.values():
            if arm.needs_batch_counts:
                arm.end_batch(counts)

    def observe_step_latency(self, latency_s):
        if self._last is not None:  # the previous batch's class and arm
            self.chooser.observe(*self._last, latency_s)
            self._last = None

    def source_report(self, num_layers):
        merged = [Counter() for _ in range(num_layers)]
        for name, arm in self.arms.items():
            if name == "lina":
                for layer, sources in enumerate(arm.source_report(num_layers)):
                    merged[layer].update(sources)
            elif self.served[name]:
                for layer in range(num_layers):
                    merged[layer][arm.source] += self.served[name]
        return [dict(sorted(m.items())) for m in merged]

    def arm_report(self):
        return self.chooser.report()


#: placements for serving with decode (``lina generate``, ``lina bench serve``) beyond the
#: per-batch policies every engine driver compares
DECODE_POLICIES: dict[str, type[ServingPolicy]] = {
    WindowPolicy.name: WindowPolicy,
    WindowPredictPolicy.name: WindowPredictPolicy,
    AutoPolicy.name: AutoPolicy,
}


def all_serving_policies() -> dict[str, type[ServingPolicy]]:
    """:data:`SERVING_POLICIES` and :data:`DECODE_POLICIES`, by name."""
    return {**SERVING_POLICIES, **DECODE_POLICIES}


def serving_policy(name: str, ctx: ServingContext) -> ServingPolicy:
    """Build the registered serving policy ``name`` for ``ctx``."""
    known = all_serving_policies()
    try:
        cls = known[name]
    except KeyError:
        raise ConfigError("policy", f"unknown serving policy {name!r}", f"use one of {', '.join(known)}") from None
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

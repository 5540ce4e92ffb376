"""Flow-level network: transfers of flow classes sharing resources by weighted max-min.

A :class:`Transfer` is one collective (or one micro-op of it): a sequence of phases, each a set
of flow classes that start together after the phase's latency; the next phase starts when
every flow of the previous one is done (a barrier, as the steps of a ring or the two halves of
a hierarchical all-to-all). Rates are recomputed by :func:`~lina.sim.maxmin.max_min_rates`
at every flow arrival and departure.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import numpy as np

from lina.sim.maxmin import max_min_rates
from lina.sim.topology import FlowClass

INTRA_SUFFIX = "-intra"  # kind of a transfer's flows inside one host: ``"a2a-intra"`` for :meth:`FlowNetwork.set_speed`


@dataclass(frozen=True, eq=False)
class Phase:
    """Flow classes that start together ``latency_s`` after the phase opens.

    ``weight`` is the fairness weight of one member flow (see ``ClusterSpec.fairness``);
    ``usage`` (``[C, R]``, what the member flows of class ``c`` take of resource ``r`` per byte
    they move: their count, times ``link_cost`` on the ports they leave and enter by),
    ``sizes`` (``[C]`` bytes per member flow), ``caps`` (``[C]``, most bytes/s of one member
    flow; ``inf``: no cap) and ``intra`` (``[C]`` bool, members inside one host) are the
    classes as arrays, built once by :func:`make_phase`.
    """

    classes: tuple[FlowClass, ...]
    latency_s: float
    weight: float
    usage: np.ndarray
    sizes: np.ndarray
    caps: np.ndarray
    intra: np.ndarray


def make_phase(
    classes: list[FlowClass] | tuple[FlowClass, ...], latency_s: float, n_resources: int, weight: float = 1.0
) -> Phase:
    """A :class:`Phase` with its usage matrix filled in."""
    usage = np.zeros((len(classes), n_resources))
    for i, fc in enumerate(classes):
        usage[i, list(fc.resources)] = fc.count
        usage[i, list(fc.resources[:2])] *= fc.link_cost
    sizes = np.array([fc.size for fc in classes], dtype=float)
    caps = np.array([fc.cap for fc in classes], dtype=float)
    intra = np.array([fc.intra for fc in classes], dtype=bool)
    return Phase(tuple(classes), latency_s, weight, usage, sizes, caps, intra)


@dataclass(frozen=True)
class Transfer:
    """One collective as the network sees it. ``bytes`` is what one GPU sends (for reports)."""

    name: str
    phases: tuple[Phase, ...]
    bytes: float = 0.0


class FlowNetwork:
    """Event-driven fluid network over a fixed set of resources.

    Args:
        capacity: ``[R]`` bytes/s of each resource.

    Use: :meth:`start` transfers, then alternate :meth:`next_event_time` and
    :meth:`advance_to`, which returns the transfers that finished.
    """

    def __init__(self, capacity: np.ndarray):
        self.capacity = np.asarray(capacity, dtype=float)
        self.now = 0.0
        self._ids = itertools.count()
        self._seq = itertools.count()
        self._timers: list[tuple[float, int, int]] = []
        self._transfers: dict[int, list] = {}
        n_res = self.capacity.shape[0]
        # active flow classes, as parallel arrays
        self._usage = np.zeros((0, n_res))
        self._weight = np.zeros(0)
        self._size = np.zeros(0)
        self._cap = np.zeros(0)
        self._kind: list[str] = []
        self._speed: dict[str, float] = {}
        self._tid = np.zeros(0, dtype=np.int64)
        self._remaining = np.zeros(0)
        self._rates = np.zeros(0)
        self._dirty = False
        self.rate_solves = 0

    # ------------------------------------------------------------------ public
    def start(self, transfer: Transfer, weight: float = 1.0, kind: str = "") -> int:
        """Begin ``transfer`` now, its flows' fairness weights scaled by ``weight``; returns its id.

        ``kind`` names what it is (``"allreduce"``, ...) for :meth:`set_speed`; its flows inside
        one host are of kind ``kind + INTRA_SUFFIX``, which moves at ``kind``'s speed unless that
        kind has a speed of its own.
        """
        if not weight > 0:
            raise ValueError(f"transfer weight must be positive, got {weight}")
        tid = next(self._ids)
        # state: transfer, phase index, open flows in the phase, weight scale, kind
        self._transfers[tid] = [transfer, -1, 0, weight, kind]
        self._open_next_phase(tid)
        return tid

    def set_speed(self, kind: str, speed: float) -> None:
        """From now on, a flow of a transfer of ``kind`` moves at most ``speed`` (in (0, 1]) of
        the rate its resources would give its class alone (a sender short of CPU), and the link
        it leaves goes to other flows."""
        if not 0.0 < speed <= 1.0:
            raise ValueError(f"speed must be in (0, 1], got {speed}")
        if self._speed.get(kind, 1.0) != speed:
            self._speed[kind] = speed
            self._dirty = True

    def busy(self) -> bool:
        return bool(self._transfers)

    def next_event_time(self) -> float:
        """Time of the next flow departure or phase start (``inf`` if idle)."""
        self._solve()
        t = self._timers[0][0] if self._timers else np.inf
        if self._remaining.size:
            with np.errstate(divide="ignore", invalid="ignore"):
                left = np.where(self._rates > 0, self._remaining / self._rates, np.inf)
            t = min(t, self.now + float(left.min()))
        return t

    def advance_to(self, t: float) -> list[int]:
        """Move time to ``t`` (not past :meth:`next_event_time`); return ids of finished transfers."""
        self._solve()
        if t < self.now:
            raise ValueError(f"time goes backwards: {t} < {self.now}")
        dt = t - self.now
        if self._remaining.size and dt > 0:
            self._remaining = self._remaining - self._rates * dt
        self.now = t
        finished: list[int] = []
        while True:
            progressed = self._retire_flows(finished)
            progressed |= self._fire_timers(finished)
            if not progressed:
                break
        return finished

    # ----------------------------------------------------------------- private
    def _open_next_phase(self, tid: int) -> None:
        state = self._transfers[tid]
        state[1] += 1
        transfer: Transfer = state[0]
        if state[1] >= len(transfer.phases):
            return
        phase = transfer.phases[state[1]]
        heapq.heappush(self._timers, (self.now + phase.latency_s, next(self._seq), tid))

    def _fire_timers(self, finished: list[int]) -> bool:
        fired = False
        while self._timers and self._timers[0][0] <= self.now + 1e-15:
            _, _, tid = heapq.heappop(self._timers)
            fired = True
            state = self._transfers[tid]
            phase: Phase = state[0].phases[state[1]]
            added = phase.sizes.shape[0]
            state[2] = added
            if added == 0:
                self._phase_done(tid, finished)
                continue
            self._usage = np.concatenate([self._usage, phase.usage])
            self._weight = np.concatenate([self._weight, np.full(added, phase.weight * state[3])])
            self._size = np.concatenate([self._size, phase.sizes])
            self._cap = np.concatenate([self._cap, phase.caps])
            self._kind.extend(state[4] + INTRA_SUFFIX if inside else state[4] for inside in phase.intra)
            self._tid = np.concatenate([self._tid, np.full(added, tid, dtype=np.int64)])
            self._remaining = np.concatenate([self._remaining, phase.sizes])
            self._rates = np.concatenate([self._rates, np.zeros(added)])  # not yet solved
            self._dirty = True
        return fired

    def _retire_flows(self, finished: list[int]) -> bool:
        if not self._remaining.size:
            return False
        done = self._remaining <= np.maximum(1e-9 * self._size, 1e-6)
        # below the clock's resolution: finishing now or a picosecond later is the same
        with np.errstate(divide="ignore", invalid="ignore"):
            left = np.where(self._rates > 0, self._remaining / self._rates, np.inf)
        done |= left <= max(1e-12, 4 * np.spacing(self.now))
        if not done.any():
            return False
        done_tids = self._tid[done].tolist()
        keep = ~done
        self._usage = self._usage[keep]
        self._weight = self._weight[keep]
        self._size = self._size[keep]
        self._cap = self._cap[keep]
        self._kind = [k for k, kept in zip(self._kind, keep) if kept]
        self._tid = self._tid[keep]
        self._remaining = self._remaining[keep]
        self._rates = self._rates[keep]
        self._dirty = True
        for tid in done_tids:
            state = self._transfers[tid]
            state[2] -= 1
            if state[2] == 0:
                self._phase_done(tid, finished)
        return True

    def _phase_done(self, tid: int, finished: list[int]) -> None:
        state = self._transfers[tid]
        if state[1] + 1 >= len(state[0].phases):
            del self._transfers[tid]
            finished.append(tid)
        else:
            self._open_next_phase(tid)

    def _solve(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        if self._remaining.size == 0:
            self._rates = np.zeros(0)
            return
        usage, capacity, caps = self._usage, self.capacity, self._cap
        if self._speed and any(v != 1.0 for v in self._speed.values()):
            speed = np.array(
                [self._speed.get(k, self._speed.get(k.removesuffix(INTRA_SUFFIX), 1.0)) for k in self._kind]
            )
            slowed = speed < 1.0
            with np.errstate(divide="ignore"):  # a member's rate with its resources to its class alone
                alone = np.where(usage[slowed] > 0, capacity[None, :] / usage[slowed], np.inf).min(axis=1)
            caps = caps.copy()
            caps[slowed] = np.minimum(caps[slowed], speed[slowed] * alone)
        capped = np.flatnonzero(np.isfinite(caps))
        if capped.size:  # a capped class gets a resource of its own, holding one member's cap
            private = np.zeros((usage.shape[0], capped.size))
            private[capped, np.arange(capped.size)] = 1.0
            usage = np.concatenate([usage, private], axis=1)
            capacity = np.concatenate([capacity, caps[capped]])
        self._rates = max_min_rates(usage, capacity, self._weight)
        self.rate_solves += 1

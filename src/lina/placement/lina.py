"""Lina's inference placement: replicate popular experts, pack unpopular ones.

Phase 1 (before the gate of a layer) calls :func:`lina_placement` on the *estimated*
popularity; phase 2 (after the real gate) calls :func:`replan_if_needed`, which keeps the
plan when the estimated top-2k experts are the real ones and otherwise re-plans on the
real counts. :func:`oracle_placement` is phase 1 with perfect knowledge.

The rule (paper section "Inference", our reading of it):

* the target load of a device is ``C = total / N`` token-slots;
* *hot* experts (estimated load >= C) get whole devices: ``n_e`` replicas in proportion
  to their load (``n_e = N * share_e``, rounded so the devices add up: each spare device
  goes to the expert whose replicas are busiest, which is largest-remainder rounding
  done greedily), each replica taking an equal share of the tokens;
* *cold* experts (0 < load < C) are packed first-fit-decreasing onto the remaining
  devices with capacity ``C`` and at most ``max_experts_per_device`` experts each; an
  expert that fits nowhere goes to the least loaded device with room;
* *idle* experts (no token expected) go to the least loaded device with room (an empty
  leftover device first), so every expert is still served.

Where we go beyond the text (each step can only lower the busiest device's load):

* the number of devices given to cold experts is chosen by trying every feasible count
  (the paper's FFD count is one of them), packing each way both first-fit-decreasing and
  longest-processing-time (heaviest expert to the least loaded device), and keeping the
  plan with the smallest busiest-device load;
* a local search then moves or swaps single-device experts off the busiest device while
  that helps (``improve=True``);
* when a replicated expert shares a device with others, its replicas' token shares are
  water-filled (less to the busier device) instead of equal.
"""

from __future__ import annotations

import math

import torch

from lina.errors import ConfigError
from lina.placement.core import Placement, max_device_load
from lina.placement.eplb import default_slots_per_device, eplb_placement
from lina.placement.metrics import topset_equal
from lina.placement.static import static_placement


def _replica_counts(hot_loads: list[float], devices: int) -> list[int]:
    """One replica each, then every spare device to the expert with the largest load per replica."""
    counts = [1] * len(hot_loads)
    if not hot_loads:
        return counts
    for _ in range(devices - len(hot_loads)):
        best = max(range(len(hot_loads)), key=lambda i: hot_loads[i] / counts[i])
        counts[best] += 1
    return counts


def _water_fill(others: list[float], amount: float) -> list[float]:
    """Split ``amount`` over devices already carrying ``others`` so their totals level out.

    Returns the part of ``amount`` each device takes (sums to ``amount``).
    """
    order = sorted(range(len(others)), key=lambda i: others[i])
    level = others[order[0]]
    remaining = amount
    filled = 1
    while filled < len(order):
        step = (others[order[filled]] - level) * filled
        if step >= remaining:
            break
        remaining -= step
        level = others[order[filled]]
        filled += 1
    level += remaining / filled
    return [max(0.0, level - o) for o in others]


def _plan(
    loads: list[float],
    hot: list[int],
    cold: list[int],
    idle: list[int],
    num_devices: int,
    cold_devices: int,
    cap: int,
    packing: str,
) -> list[dict[int, float]] | None:
    """One candidate: ``cold_devices`` devices for cold experts, the rest for hot replicas.

    ``packing="ffd"``: cold experts first-fit-decreasing into bins of capacity
    ``total / N`` (the paper); ``"lpt"``: each, heaviest first, onto the least loaded cold
    device with room. Either way an expert that fits nowhere goes to the least loaded
    device with room.

    Returns ``assign[n] = {expert: token-slots}`` per device, or None when the experts do
    not fit under ``cap`` this way.
    """
    num_hot_devices = num_devices - cold_devices
    capacity = sum(loads) / num_devices
    assign: list[dict[int, float]] = [dict() for _ in range(num_devices)]
    device_load = [0.0] * num_devices

    def put(device: int, expert: int, amount: float) -> None:
        assign[device][expert] = assign[device].get(expert, 0.0) + amount
        device_load[device] += amount

    def least_loaded_with_room(candidates: range) -> int | None:
        room = [n for n in candidates if len(assign[n]) < cap]
        return min(room, key=lambda n: (device_load[n], len(assign[n]), n)) if room else None

    next_device = 0
    for expert, reps in zip(hot, _replica_counts([loads[e] for e in hot], num_hot_devices)):
        for _ in range(reps):
            put(next_device, expert, loads[expert] / reps)
            next_device += 1
    cold_range = range(num_hot_devices, num_devices)
    for expert in cold:  # already sorted by load, decreasing
        fit = None
        if packing == "ffd":
            fit = next(
                (
                    n
                    for n in cold_range
                    if len(assign[n]) < cap and device_load[n] + loads[expert] <= capacity * (1 + 1e-9)
                ),
                None,
            )
        if fit is None:
            fit = least_loaded_with_room(cold_range)
        if fit is None:
            fit = least_loaded_with_room(range(num_devices))
        if fit is None:
            return None
        put(fit, expert, loads[expert])
    for expert in idle:
        fit = least_loaded_with_room(range(num_devices))
        if fit is None:
            return None
        put(fit, expert, 0.0)
    return assign


def _device_loads(assign: list[dict[int, float]]) -> list[float]:
    return [sum(items.values()) for items in assign]


def _improve(assign: list[dict[int, float]], loads: list[float], cap: int, max_rounds: int) -> None:
    """Local search on experts held by one device: move or swap one off the busiest device
    while that lowers the busier of the two devices involved. In place."""
    single = {e for e in range(len(loads)) if sum(e in items for items in assign) == 1}
    device_load = _device_loads(assign)
    for _ in range(max_rounds):
        busiest = max(range(len(assign)), key=lambda n: device_load[n])
        top = device_load[busiest]
        best = None  # (new pair max, expert out, device, expert in or None)
        for x in [e for e in assign[busiest] if e in single and loads[e] > 0]:
            for d in range(len(assign)):
                if d == busiest:
                    continue
                if len(assign[d]) < cap:
                    pair = max(top - loads[x], device_load[d] + loads[x])
                    if pair < top - 1e-9 and (best is None or pair < best[0]):
                        best = (pair, x, d, None)
                for y in assign[d]:
                    if y in single and loads[y] < loads[x]:
                        pair = max(top - loads[x] + loads[y], device_load[d] + loads[x] - loads[y])
                        if pair < top - 1e-9 and (best is None or pair < best[0]):
                            best = (pair, x, d, y)
        if best is None:
            return
        _, x, d, y = best
        del assign[busiest][x]
        assign[d][x] = loads[x]
        device_load[busiest] -= loads[x]
        device_load[d] += loads[x]
        if y is not None:
            del assign[d][y]
            assign[busiest][y] = loads[y]
            device_load[d] -= loads[y]
            device_load[busiest] += loads[y]


def _level_replicas(assign: list[dict[int, float]], loads: list[float]) -> None:
    """Water-fill the token shares of replicated experts whose devices carry unequal other load. In place."""
    device_load = _device_loads(assign)
    for expert in sorted(range(len(loads)), key=lambda e: -loads[e]):
        devices = [n for n in range(len(assign)) if expert in assign[n]]
        if len(devices) < 2 or loads[expert] <= 0:
            continue
        others = [device_load[n] - assign[n][expert] for n in devices]
        if max(others) - min(others) <= 1e-12:
            continue
        for n, part in zip(devices, _water_fill(others, loads[expert])):
            device_load[n] += part - assign[n][expert]
            if part > 0:
                assign[n][expert] = part
            else:
                del assign[n][expert]


def _to_placement(loads: list[float], assign: list[dict[int, float]], num_experts: int) -> Placement:
    share = torch.zeros(num_experts, len(assign), dtype=torch.float64)
    for device, items in enumerate(assign):
        for expert, amount in items.items():
            share[expert, device] = amount / loads[expert] if loads[expert] > 0 else 1.0
    share = share / share.sum(dim=1, keepdim=True)  # idle experts: their one device takes all
    return Placement(num_experts, len(assign), share)


def lina_placement(
    load: torch.Tensor, num_devices: int, max_experts_per_device: int = 4, improve: bool = True
) -> Placement:
    """Lina's placement of one layer from (estimated) popularity.

    Args:
        load: ``Tensor[E]``, expected token-slots per expert (>= 0), e.g. an estimator's
            :meth:`popularity` or the real counts.
        num_devices: ``N``.
        max_experts_per_device: packing limit (paper: 4); raised to ``ceil(E / N)`` when
            the experts would not fit otherwise.
        improve: finish with the local search (moves/swaps of single-device experts off
            the busiest device); False gives the constructive plan only.
    Returns:
        a :class:`Placement`; every expert is held by at least one device. With no load at
        all, the static layout.
    """
    load = torch.as_tensor(load, dtype=torch.float64).flatten()
    num_experts = int(load.numel())
    if num_devices < 1:
        raise ConfigError("num_devices", f"is {num_devices}", "give at least 1 device")
    if max_experts_per_device < 1:
        raise ConfigError("max_experts_per_device", f"is {max_experts_per_device}", "give at least 1")
    if num_experts == 0 or not torch.isfinite(load).all() or (load < 0).any():
        raise ConfigError("load", "is empty, negative or non-finite", "give expected token-slots per expert, >= 0")
    total = float(load.sum())
    if total <= 0:
        return static_placement(num_experts, num_devices)
    cap = max(max_experts_per_device, math.ceil(num_experts / num_devices))
    loads = load.tolist()
    capacity = total / num_devices
    by_load = sorted(range(num_experts), key=lambda e: (-loads[e], e))
    hot = [e for e in by_load if loads[e] >= capacity]
    cold = [e for e in by_load if 0 < loads[e] < capacity]
    idle = [e for e in by_load if loads[e] == 0]

    best_assign, best_cost = None, math.inf
    first = 0 if hot else num_devices  # without hot experts every device is a cold one
    for cold_devices in range(first, num_devices - len(hot) + 1):
        for packing in ("ffd", "lpt"):
            assign = _plan(loads, hot, cold, idle, num_devices, cold_devices, cap, packing)
            if assign is None:
                continue
            _level_replicas(assign, loads)
            cost = max(_device_loads(assign))
            if cost < best_cost - 1e-9 * total:
                best_assign, best_cost = assign, cost
    if improve:
        _improve(best_assign, loads, cap, max_rounds=4 * num_experts)
        _level_replicas(best_assign, loads)
    placement = _to_placement(loads, best_assign, num_experts)
    if improve:
        # Beyond the paper: also try balanced replication with one spare expert slot per device
        # (DeepSeek EPLB's construction, within the same per-device cap) and keep the better plan.
        slots = min(cap, default_slots_per_device(num_experts, num_devices))
        if num_devices * slots >= num_experts:
            alt = eplb_placement(load, num_devices, slots)
            if max_device_load(alt, load) < max_device_load(placement, load) * (1 - 1e-9):
                return alt
    return placement


def oracle_placement(counts: torch.Tensor, num_devices: int, max_experts_per_device: int = 4) -> Placement:
    """Lina's placement on the real counts of the batch (what phase 2 re-plans to): ``Tensor[E] -> Placement``."""
    return lina_placement(counts, num_devices, max_experts_per_device)


def replan_if_needed(
    planned: Placement,
    estimated: torch.Tensor,
    real_counts: torch.Tensor,
    top_k: int,
    max_experts_per_device: int = 4,
) -> tuple[Placement, bool]:
    """Phase 2: keep ``planned`` if the estimated top-2k experts are the real top-2k.

    Args:
        planned: phase 1's placement (from ``estimated``).
        estimated: ``Tensor[E]`` estimated popularity used for ``planned``.
        real_counts: ``Tensor[E]`` token-slots per expert from the real gate.
        top_k: the model's k; the compared list has ``2k`` experts (capped at E).
    Returns:
        ``(placement, replanned)``.
    """
    n = min(2 * top_k, planned.num_experts)
    if topset_equal(estimated, real_counts, n):
        return planned, False
    return oracle_placement(real_counts, planned.num_devices, max_experts_per_device), True


__all__ = ["lina_placement", "oracle_placement", "replan_if_needed"]

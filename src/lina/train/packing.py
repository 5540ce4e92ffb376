"""Expert packing in training: how many experts each rank holds, decided from measured micro-ops
(the one-off move of experts and their AdamW state when that changes is :mod:`lina.train.relayout`).

Lina's rule: when one expert-FFN micro-op is shorter than one all-to-all micro-op the pipeline has
bubbles, so double the experts per rank (1, 2, 4, ...): the expert-parallel (EP) group shrinks to
E / (experts per rank) ranks, the all-to-all runs among fewer, nearer peers, and every expert is
replicated over W / (EP size) ranks whose gradients join the low-priority allreduce.

``--packing`` (``TrainConfig.packing.mode``):
  ``off``   the layout of ``--ep-size`` for the whole run (a resumed checkpoint keeps its own);
  ``auto``  the controller: first decision before step ``packing.first_step`` (10), re-checked
            every ``packing.every`` (4) steps; packing only grows;
  ``N``     N experts per rank (not a factor: with E experts the EP size is E / N) from the start;
  ``N@S``   N experts per rank from step S on (a reproducible change, for experiments and tests).

The controller reads the forward micro-ops of the last ``packing.every`` steps off the one
timeline: spans of kind ``dispatch`` / ``combine`` (all-to-all) and ``expert`` (FFN compute) with phase
``fwd`` (:mod:`lina.obs.schema`). Their durations are summed over all ranks (a 4-number allreduce) and rank 0's
decision on the mean per micro-op is broadcast, so every rank changes layout at the same step.
It doubles only when the packed experts of one MoE layer fit ``packing.max_expert_memory_mb`` (the layer
that computes must be on the device; the others may be offloaded, see :func:`plan_residency`).

Beyond the paper: packing replicates experts, and their gradients then cross the network in the
allreduce, which the paper's rule does not weigh. So the controller also compares the mean step
time of the window after a doubling with the window before it; if steps got slower by more than
``REVERT_MARGIN``, it goes back to the fastest packing it has measured (not only the previous one: a
chain of doublings that each cost a little is undone as a whole) and settles there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lina.obs import schema
from lina.obs.timeline import Span, Timeline
from lina.policy.packing import (  # noqa: F401  (the packing grammar, re-exported for callers of this module)
    REVERT_MARGIN,
    PackingSpec,
    packing_ep_sizes,
    parse_packing,
    valid_experts_per_rank,
)

# --- measuring and deciding --------------------------------------------------------------------


@dataclass
class MicroOpTimes:
    """Forward micro-op durations summed over a window (of one rank, or of all ranks)."""

    ffn_s: float = 0.0
    ffn_ops: int = 0
    a2a_s: float = 0.0
    a2a_ops: int = 0
    step_s: float = 0.0  # whole steps in the window
    steps: int = 0

    @property
    def step_mean_s(self) -> float | None:
        return self.step_s / self.steps if self.steps else None

    @property
    def ffn_per_op_s(self) -> float | None:
        return self.ffn_s / self.ffn_ops if self.ffn_ops else None

    @property
    def a2a_per_op_s(self) -> float | None:
        return self.a2a_s / self.a2a_ops if self.a2a_ops else None


def forward_micro_ops(spans: list[Span]) -> MicroOpTimes:
    """Sum the forward expert-FFN micro-ops (kind ``expert``) and forward token all-to-all
    micro-ops (kind ``dispatch`` or ``combine``) among ``spans``."""
    out = MicroOpTimes()
    for s in spans:
        if s.phase != "fwd":
            continue
        if s.cat == "compute" and s.kind == schema.EXPERT:
            out.ffn_s += s.dur_s
            out.ffn_ops += 1
        elif s.cat == "a2a" and s.kind in schema.TOKEN_A2A:
            out.a2a_s += s.dur_s
            out.a2a_ops += 1
    return out


def spans_of_steps(spans: list[Span], first: int, last: int) -> list[Span]:
    """The spans that start inside the ``step`` spans of steps ``first..last``."""
    windows = [(s.start_s, s.end_s) for s in spans if s.cat == "step" and first <= s.args.get("step", -1) <= last]
    return [s for s in spans if s.cat != "step" and any(a <= s.start_s <= b for a, b in windows)]


def measure_window(spans: list[Span], first: int, last: int) -> MicroOpTimes:
    """Forward micro-ops and whole-step times of steps ``first..last`` (one rank)."""
    times = forward_micro_ops(spans_of_steps(spans, first, last))
    steps = [s for s in spans if s.cat == "step" and first <= s.args.get("step", -1) <= last]
    times.step_s, times.steps = sum(s.dur_s for s in steps), len(steps)
    return times


@dataclass
class Decision:
    experts_per_rank: int  # the packing to use from now on
    reason: str


def decide(
    experts_per_rank: int, ffn_per_op_s: float | None, a2a_per_op_s: float | None, can_double: bool, fits: bool
) -> Decision:
    """Lina's rule: double the experts per rank while one FFN micro-op is shorter than one
    all-to-all micro-op, a smaller EP group exists, and the packed experts fit in memory."""
    keep = experts_per_rank
    if ffn_per_op_s is None or a2a_per_op_s is None:
        return Decision(keep, "no forward all-to-all or FFN micro-op measured")
    ratio = f"FFN {ffn_per_op_s * 1e3:.2f} ms vs all-to-all {a2a_per_op_s * 1e3:.2f} ms per micro-op"
    if ffn_per_op_s >= a2a_per_op_s:
        return Decision(keep, f"{ratio}: no bubble, keep")
    if not can_double:
        return Decision(keep, f"{ratio}, but no smaller EP group exists")
    if not fits:
        return Decision(
            keep, f"{ratio}, but {2 * experts_per_rank} packed experts of one layer exceed max_expert_memory_mb"
        )
    return Decision(2 * experts_per_rank, f"{ratio}: pack")


def got_slower(before_s: float | None, after_s: float | None, margin: float = REVERT_MARGIN) -> bool:
    """Whether the mean step after a packing change is slower than before it by more than
    ``margin`` (unknown times: no)."""
    return before_s is not None and after_s is not None and after_s > before_s * (1 + margin)


def plan_residency(layer_bytes: list[int], budget_bytes: int) -> list[bool]:
    """Which MoE layers keep their experts on the device (True), in layer order, within
    ``budget_bytes`` (0 = no limit); the others are offloaded to host memory."""
    if budget_bytes <= 0:
        return [True] * len(layer_bytes)
    out, used = [], 0
    for nbytes in layer_bytes:
        fits = used + nbytes <= budget_bytes
        used += nbytes if fits else 0
        out.append(fits)
    return out


@dataclass
class PackingController:
    """Decides, before each step, the EP size to run it with (see the module docstring).

    Args:
        spec: what ``--packing`` asked for.
        experts: E, experts per MoE layer.
        base_ep: the EP size of ``--ep-size`` (the starting layout of ``auto`` and ``N@S``).
        first_step, every: ``auto``'s schedule.
        budget_bytes: ``max_expert_memory_mb`` in bytes (0 = no limit).
    """

    spec: PackingSpec
    experts: int
    base_ep: int
    first_step: int = 10
    every: int = 4
    budget_bytes: int = 0
    history: list[dict] = field(default_factory=list)
    pending: dict | None = None  # the last doubling, to be confirmed: {"from_ep", "step_before_s"}
    settled: bool = False  # a doubling was undone: no further changes
    step_s_by_packing: dict[int, float] = field(default_factory=dict)  # experts per rank -> mean step measured there

    @classmethod
    def from_config(cls, cfg, world: int) -> "PackingController":
        return cls(
            parse_packing(cfg.effective_packing),
            cfg.model.experts,
            cfg.ep_size or world,
            cfg.packing.first_step,
            cfg.packing.every,
            int(cfg.packing.max_expert_memory_mb * 1024 * 1024),
        )

    def ep_sizes(self) -> list[int]:
        return packing_ep_sizes(self.spec, self.experts, self.base_ep)

    def initial_ep(self) -> int:
        if self.spec.mode == "fixed" and self.spec.at_step == 0:
            return self.experts // self.spec.experts_per_rank
        return self.base_ep

    def due(self, step: int) -> bool:
        return self.spec.mode == "auto" and step >= self.first_step and (step - self.first_step) % self.every == 0

    def target_ep(self, step: int, current_ep: int, timeline: Timeline, layer_training_bytes: int) -> int:
        """The EP size for ``step``. For ``auto`` on a decision step this is a collective (every
        rank calls it at the same steps); otherwise it is local.

        Args:
            layer_training_bytes: what one MoE layer's local experts take now (weights, grads,
                AdamW moments); doubling must keep it within the budget.
        """
        per_rank = self.experts // current_ep
        if self.spec.mode == "fixed" and step >= self.spec.at_step:
            target = self.experts // self.spec.experts_per_rank
            if target != current_ep:
                self.history.append(
                    {
                        "step": step,
                        "experts_per_rank": per_rank,
                        "new_experts_per_rank": self.spec.experts_per_rank,
                        "reason": f"fixed: {self.spec.experts_per_rank} experts per rank from step {self.spec.at_step}",
                    }
                )
            return target
        if not self.due(step):
            return current_ep
        times = _sum_over_ranks(measure_window(timeline.spans(), step - self.every, step - 1))
        if times.step_mean_s is not None:
            self.step_s_by_packing[per_rank] = times.step_mean_s
        pending, self.pending = self.pending, None
        if self.settled:
            decision = Decision(per_rank, "settled (an earlier doubling made steps slower)")
        elif pending and got_slower(pending["step_before_s"], times.step_mean_s):
            best = min(self.step_s_by_packing, key=self.step_s_by_packing.get)
            decision = Decision(
                best,
                f"steps got slower after packing ({times.step_mean_s * 1e3:.1f} ms vs "
                f"{pending['step_before_s'] * 1e3:.1f} ms): back to {best}, the fastest measured, and settle",
            )
        else:
            fits = self.budget_bytes <= 0 or 2 * layer_training_bytes <= self.budget_bytes
            decision = decide(per_rank, times.ffn_per_op_s, times.a2a_per_op_s, current_ep % 2 == 0, fits)
        agreed = _from_rank0(decision.experts_per_rank)  # rank 0 decides; the state below follows from it alone
        if agreed > per_rank:
            self.pending = {"from_ep": current_ep, "step_before_s": times.step_mean_s}
        elif agreed < per_rank:
            self.settled = True
        self.history.append(
            {
                "step": step,
                "experts_per_rank": per_rank,
                "new_experts_per_rank": agreed,
                "reason": decision.reason,
                "ffn_per_op_ms": None if times.ffn_per_op_s is None else times.ffn_per_op_s * 1e3,
                "a2a_per_op_ms": None if times.a2a_per_op_s is None else times.a2a_per_op_s * 1e3,
                "step_ms": None if times.step_mean_s is None else times.step_mean_s * 1e3,
                "ffn_ops": times.ffn_ops,
                "a2a_ops": times.a2a_ops,
            }
        )
        return self.experts // agreed

    def state_dict(self) -> dict:
        return {
            "history": list(self.history),
            "pending": self.pending,
            "settled": self.settled,
            "step_s_by_packing": {str(k): v for k, v in self.step_s_by_packing.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        self.pending = state.get("pending")
        self.settled = bool(state.get("settled", False))
        self.step_s_by_packing = {int(k): float(v) for k, v in state.get("step_s_by_packing", {}).items()}


def _sum_over_ranks(t: MicroOpTimes) -> MicroOpTimes:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    buf = torch.tensor([t.ffn_s, t.ffn_ops, t.a2a_s, t.a2a_ops, t.step_s, t.steps], dtype=torch.float64)
    dist.all_reduce(buf)
    return MicroOpTimes(float(buf[0]), int(buf[1]), float(buf[2]), int(buf[3]), float(buf[4]), int(buf[5]))


def _from_rank0(value: int) -> int:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    buf = torch.tensor([value], dtype=torch.long)
    dist.broadcast(buf, src=0)
    return int(buf)

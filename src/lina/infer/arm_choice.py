"""Which placement serves the next batch, chosen by measured step latency.

A placement that balances load pays for it (planning on the host, routing among replicas, weights
moved); whether that pays depends on the batch: a prefill batch of thousands of tokens gains from
balance, a decode step of a few dozen often does not. :class:`FastestArm` keeps, for every class of
batch size, a decayed mean of the step latency each candidate ("arm") gave, serves the fastest, and
now and then serves another once more so that a change in the workload is noticed. It sees only
numbers every rank agrees on (the batch's global token count and the step latency maximised over
ranks), so every rank makes the same choice without talking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class ArmRecord:
    """What one arm gave on one class of batch: batches measured, decayed mean latency (s), and the
    batch index (within the class) it was last measured at."""

    batches: int = 0
    mean_s: float = math.nan
    last: int = -1


def batch_class(tokens: float) -> int:
    """The class of a batch of ``tokens`` tokens over all ranks: ``ceil(log2(tokens))`` (0 for at
    most one token), so a decode step and a prefill batch never share one."""
    return 0 if tokens <= 1 else math.ceil(math.log2(tokens))


class FastestArm:
    """Serve each class of batch with the arm of lowest recent step latency.

    Args:
        arms: candidate names, the preferred first (ties and the first tries go in this order).
        probe_every: in every ``probe_every`` batches of a class, one serves the arm measured
            longest ago instead of the fastest (so at most ``1 / probe_every`` of the batches pay
            for a slower arm; 64: under 2%, clear of a p95).
        decay: weight of the past in an arm's mean latency.
        margin: the fastest arm takes over from the one serving only when its mean latency is
            lower by more than this fraction (one lucky step does not make an arm serve).
    """

    def __init__(self, arms: tuple[str, ...], probe_every: int = 64, decay: float = 0.7, margin: float = 0.03):
        if len(arms) < 1 or len(set(arms)) != len(arms):
            raise ValueError(f"arms must be distinct names, got {arms!r}")
        if probe_every < 2:
            raise ValueError(f"probe_every must be at least 2, got {probe_every}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"margin must lie in [0, 1), got {margin}")
        self.arms, self.probe_every, self.decay, self.margin = arms, probe_every, decay, margin
        self.records: dict[int, dict[str, ArmRecord]] = {}
        self._served: dict[int, int] = {}  # class -> batches of it so far
        self._serving: dict[int, str] = {}  # class -> the arm that serves it between probes

    def choose(self, klass: int) -> str:
        """The arm to serve the next batch of class ``klass`` (call :meth:`observe` after it)."""
        records = self.records.get(klass) or {arm: ArmRecord() for arm in self.arms}
        index = self._served.get(klass, 0)
        untried = [arm for arm in self.arms if records[arm].batches == 0]
        if untried:
            return untried[0]
        best = self._serving[klass]
        if len(self.arms) > 1 and index % self.probe_every == self.probe_every - 1:
            others = [arm for arm in self.arms if arm != best]
            return min(others, key=lambda arm: records[arm].last)
        return best

    def observe(self, klass: int, arm: str, latency_s: float) -> None:
        """The step latency ``arm`` gave on a batch of class ``klass``."""
        records = self.records.setdefault(klass, {a: ArmRecord() for a in self.arms})
        index = self._served.get(klass, 0)
        rec = records[arm]
        rec.mean_s = latency_s if rec.batches == 0 else self.decay * rec.mean_s + (1 - self.decay) * latency_s
        rec.batches += 1
        rec.last = index
        self._served[klass] = index + 1
        if all(r.batches for r in records.values()):
            fastest = min(self.arms, key=lambda a: records[a].mean_s)  # first in order on a tie
            serving = self._serving.get(klass)
            if serving is None or records[fastest].mean_s < records[serving].mean_s * (1 - self.margin):
                self._serving[klass] = fastest

    def report(self) -> dict[str, dict[str, dict]]:
        """Per class (``"<=N tokens"``), per arm: batches measured and mean latency in ms."""
        return {
            f"<={2**klass} tokens": {
                arm: {"batches": r.batches, "mean_ms": None if r.batches == 0 else r.mean_s * 1e3}
                for arm, r in records.items()
            }
            for klass, records in sorted(self.records.items())
        }

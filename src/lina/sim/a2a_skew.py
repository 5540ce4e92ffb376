"""How uneven a run's all-to-alls were, from its timelines.

With dropless routing every rank sends what its tokens chose and receives what its experts
were chosen for, so the ranks of one all-to-all move different bytes and it ends when the
busiest is done. The trainer's all-to-all spans record what a rank *sends* to the other ranks
(their ``bytes`` field); a forward combine sends back the outputs of the tokens its dispatch
received, so a rank's combine bytes are what it received in the dispatch of the same layer and
micro-op. The skew of a run is then

    sum over forward dispatches of  max over ranks of max(sent, received)
    ---------------------------------------------------------------------
    sum over forward dispatches of  mean over ranks of sent

(backward all-to-alls carry the same matrices transposed). It is 1.0 when every rank sends and
receives alike, and what :attr:`lina.sim.spec.TrainSpec.a2a_skew` takes. Taken by host instead
(``ranks_per_unit``), the bytes of a host's ranks add up first: where ranks share a host's link,
the busiest link rather than the busiest rank ends the all-to-all.
"""

from __future__ import annotations

from lina.obs import schema
from lina.obs.timeline import Span

MIN_BYTES = 1024  # smaller all-to-alls are the per-expert token counts, not tokens


def _key(span: Span) -> tuple[object, object] | None:
    """(layer, micro-op) of a forward dispatch or combine span, else ``None``."""
    if span.cat != "a2a" or span.kind not in schema.TOKEN_A2A or span.phase != "fwd":
        return None
    if float(span.bytes or 0.0) < MIN_BYTES:
        return None
    return span.layer, span.micro_op


def _exchanges(spans: list[Span]) -> dict[tuple, tuple[float, float]]:
    """One rank's forward exchanges: (layer, micro-op, n-th time) -> (bytes sent, bytes received)."""
    seen: dict[tuple, int] = {}
    sent: dict[tuple, float] = {}
    received: dict[tuple, float] = {}
    for span in sorted(spans, key=lambda s: s.start_s):
        key = _key(span)
        if key is None:
            continue
        count_key = (*key, span.kind)
        n = seen.get(count_key, 0)
        seen[count_key] = n + 1
        (sent if span.kind == schema.DISPATCH else received)[(*key, n)] = float(span.bytes)
    return {k: (sent[k], received[k]) for k in sent if k in received}


def a2a_skew(spans_by_rank: dict[int, list[Span]], ranks_per_unit: int = 1) -> float:
    """The run's all-to-all skew (see the module docstring); 1.0 when no exchange was recorded on
    every rank (or with one rank).

    Args:
        spans_by_rank: rank -> its timeline spans.
        ranks_per_unit: ranks whose bytes add up before the busiest is taken: 1 for ranks,
            the ranks of a host for hosts (whose links the ranks share; contiguous ranks).
    """
    ranks = sorted(spans_by_rank)
    per_rank = [_exchanges(spans_by_rank[r]) for r in ranks]
    if len(per_rank) < 2:
        return 1.0
    common = set.intersection(*(set(x) for x in per_rank))
    units = max(1, len(ranks) // ranks_per_unit)
    busiest = mean = 0.0
    for key in common:
        sent, received = [0.0] * units, [0.0] * units
        for i, x in enumerate(per_rank):
            unit = min(i // ranks_per_unit, units - 1)
            sent[unit] += x[key][0]
            received[unit] += x[key][1]
        busiest += max(max(sent), max(received))
        mean += sum(sent) / units
    return max(1.0, busiest / mean) if mean > 0 else 1.0

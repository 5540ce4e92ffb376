"""The layout of a measured run: its expert-parallel group, how the group sits on hosts, and
which runs share a shape (differ only in policy)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lina.sim.calibration.runs import RunRecord


def ep_of(run: RunRecord) -> int:
    """Ranks of one expert-parallel group."""
    return run.ep_size or min(run.model.experts, run.workers)


def group_ranks_per_host(run: RunRecord) -> int:
    """Ranks of one all-to-all group on each of its hosts."""
    return min(run.workers_per_host, ep_of(run))


def busiest_link_bytes(run: RunRecord, sent: float) -> float:
    """Bytes of one uniform all-to-all on the busiest host link, when each rank sends ``sent``
    bytes to the other ranks of its group (what the trainer's spans record)."""
    ep, g = ep_of(run), group_ranks_per_host(run)
    if ep <= g:
        return 0.0
    return g * sent * (ep - g) / (ep - 1)


def shape_key(run: RunRecord) -> tuple:
    """Runs that differ only in policy share this key (and so the same compute work)."""
    m = run.model
    return (
        run.hosts,
        run.workers_per_host,
        run.link_bps,
        m.layers,
        m.d_model,
        m.d_ff,
        m.experts,
        m.top_k,
        m.tokens,
        ep_of(run),
    )

"""Calibration rows of configurations measured more than once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lina.sim.repeats import pooled_rows, step_times


def row(config, measured, predicted, policy="lina"):
    return {"config": config, "policy": policy, "measured_s": measured, "predicted_s": predicted}


def test_runs_of_one_configuration_pool_their_steps():
    """Two runs of one configuration (steps 1, 2, 3 and 4, 5 s; medians 2 and 4.5) pool to a
    median of 3 s, predicted at the median of their predictions (2.7 and 3.9: 3.3, +10%); the same
    shape under another policy stays apart; a run without step spans counts with its median."""
    rows = [row("a", 2.0, 2.7), row("a", 4.5, 3.9), row("a", 2.0, 2.0, policy="ddp-overlap"), row("b", 1.0, 1.1)]
    out = pooled_rows(rows, [[1.0, 2.0, 3.0], [4.0, 5.0], [2.0], []])
    assert [(r["config"], r["policy"], r["runs"]) for r in out] == [
        ("a", "lina", 2),
        ("a", "ddp-overlap", 1),
        ("b", "lina", 1),
    ]
    first = out[0]
    assert first["run_medians_s"] == [2.0, 4.5]
    assert (first["measured_s"], first["predicted_s"]) == pytest.approx((3.0, 3.3))
    assert first["error"] == pytest.approx(0.1)
    assert out[2]["measured_s"] == 1.0 and out[2]["error"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="step lists"):
        pooled_rows(rows, [[1.0]])


def test_step_times_are_rank_zero_step_spans():
    spans = {
        0: [
            SimpleNamespace(cat="step", dur_s=1.5),
            SimpleNamespace(cat="compute", dur_s=0.2),
            SimpleNamespace(cat="step", dur_s=1.7),
        ],
        1: [SimpleNamespace(cat="step", dur_s=9.0)],
    }
    assert step_times(spans) == [1.5, 1.7]
    assert step_times({}) == []

"""The network fits of a calibration recover known parameters from noiseless and noisy samples."""

from __future__ import annotations

import numpy as np
import pytest

from lina.sim.calibration.links import a2a_seconds, fit_a2a, fit_allreduce, fit_loopback


def test_allreduce_fit_separates_launch_hop_and_efficiency():
    """Rings of 2 and 4 ranks (2 and 6 steps), several sizes: launch 1 ms, 0.5 ms a step, links at 80%."""
    rng = np.random.default_rng(0)
    steps = np.repeat([2.0, 6.0], 50)
    line = rng.uniform(0.002, 0.02, size=100)
    dur = 1e-3 + steps * 5e-4 + line / 0.8
    launch, hop, eff, slow = fit_allreduce(np.stack([steps, line, dur], axis=1))
    assert (launch, hop, eff) == pytest.approx((1e-3, 5e-4, 0.8), rel=1e-6) and slow == 0.0
    # one ring size: the latency is one number, put in the launch
    one = np.stack([steps[:50], line[:50], dur[:50]], axis=1)
    launch, hop, eff, _ = fit_allreduce(one)
    assert hop == 0.0 and launch == pytest.approx(1e-3 + 2 * 5e-4) and eff == pytest.approx(0.8)


def test_allreduce_fit_keeps_efficiency_at_most_one_and_latencies_non_negative():
    """Durations faster than line rate would need an efficiency above 1: it is held at 1."""
    steps = np.full(20, 2.0)
    line = np.linspace(0.001, 0.02, 20)
    dur = line / 1.2 + 1e-4
    launch, hop, eff, _ = fit_allreduce(np.stack([steps, line, dur], axis=1))
    assert eff == 1.0 and launch >= 0 and hop >= 0


def test_allreduce_fit_finds_the_speed_lost_beside_compute():
    """Allreduces with compute beside them for some seconds (from their start) took longer: with
    40% of the speed lost then, by 0.4 s per second computed past their latency."""
    rng = np.random.default_rng(2)
    steps = np.repeat([2.0, 6.0], 60)
    line = rng.uniform(0.002, 0.02, size=120)
    busy = np.tile([0.0, 0.005, 0.02], 40)
    latency = 1e-3 + steps * 5e-4
    dur = latency + line / 0.9 + 0.4 * np.maximum(0.0, busy - latency)
    launch, hop, eff, slow = fit_allreduce(np.stack([steps, line, dur, busy], axis=1))
    assert slow == pytest.approx(0.4) and eff == pytest.approx(0.9)
    assert launch == pytest.approx(1e-3) and hop == pytest.approx(5e-4)


def test_allreduce_fit_weights_samples():
    """A weight counts like repeated samples."""
    s = np.array([[2.0, 0.01, 0.02], [6.0, 0.01, 0.03], [2.0, 0.02, 0.035], [6.0, 0.02, 0.05]])
    w = np.array([3.0, 1.0, 2.0, 1.0])
    assert fit_allreduce(s, w) == pytest.approx(fit_allreduce(np.repeat(s, w.astype(int), axis=0)))


def test_a2a_fit_recovers_a_per_core_rate_and_a_flow_cap():
    """Three layouts: one flow per peer bounds the 2x1 pair (its ranks have a whole core each),
    the per-core rate bounds the 4x1 ranks (half a core each); the 2x2 layout has its link bound.
    Every sample is its model's duration with 2% noise; tiny all-to-alls give the latency."""
    core, flow, eff, latency = 55e6, 25e6, 1.0, 3e-3
    rng = np.random.default_rng(1)
    rows = []
    for sent in (1e6, 2e6, 3e6):
        rows += [(sent / 50e6, sent, sent, 1.0)]  # 2x1: one peer on the other host
        rows += [(sent / 50e6, sent, sent / 3, 0.5)]  # 4x1: three peers, one per host
        rows += [(2 * sent * 2 / 3 / 20e6, sent, sent / 3, 1.0)]  # 2x2 on slow links: the link binds
    x = np.asarray(rows)
    truth = a2a_seconds(np.column_stack([x, np.zeros(len(x))]), latency, eff, np.array([core]), np.array([flow]))[0, 0]
    samples = np.column_stack(
        [np.repeat(x, 20, axis=0), np.repeat(truth, 20) * rng.uniform(0.98, 1.02, size=20 * len(x))]
    )
    lat, core_fit, flow_fit, loss, note = fit_a2a(samples, [latency] * 10, eff)
    assert lat == pytest.approx(latency)
    assert core_fit == pytest.approx(core, rel=0.05) and flow_fit == pytest.approx(flow, rel=0.05) and not note
    assert loss == 0.0  # five columns: no flow counts, no loss searched


def test_a2a_fit_finds_no_limit_where_the_link_explains_everything():
    x = np.array([[s / 40e6, s, s / 3, 0.5] for s in np.linspace(1e6, 4e6, 10)])
    dur = 1e-3 + x[:, 0] / 0.8
    lat, core, flow, _, _ = fit_a2a(np.column_stack([x, dur]), [1e-3], 0.8)
    assert core is None and flow is None and lat == pytest.approx(1e-3)


def test_a2a_fit_recovers_the_goodput_lost_per_extra_flow_between_two_hosts():
    """4x1 ranks (one flow per host pair) are bound by their per-core rate; 2x2 ranks (four flows
    between the two hosts, on slower links) by their link, which loses 6% per extra flow."""
    core, eff, latency, loss = 30e6, 0.9, 3e-3, 0.06
    rows = []
    for sent in (1e6, 2e6, 3e6):
        rows += [(sent / 50e6, sent, sent / 3, 0.5, 0.0, 1)]  # 4x1
        inter = sent * 2 / 3
        rows += [(2 * inter / 20e6, inter, sent / 3, 0.5, 0.0, 4)]  # 2x2 on slower links: bytes to the other host count
    x = np.asarray(rows)
    x[:, 4] = a2a_seconds(x, latency, eff, np.array([core]), np.array([np.inf]), loss)[0, 0]
    lat, core_fit, flow_fit, loss_fit, _ = fit_a2a(x, [latency], eff)
    assert loss_fit == pytest.approx(loss, abs=0.011)
    assert core_fit == pytest.approx(core, rel=0.05) and flow_fit is None


def test_loopback_fit_recovers_the_rate_per_core():
    rate, latency = 400e6, 2e-3
    sent = np.array([1e6, 2e6, 1e6, 3e6])
    share = np.array([0.5, 0.5, 1.0, 1.0])
    assert fit_loopback(np.column_stack([sent, share, latency + sent / (rate * share)]), latency) == pytest.approx(rate)
    assert fit_loopback(np.zeros((0, 3)), latency) is None


def test_allreduce_fit_of_one_size_keeps_the_link_at_its_rate():
    """Allreduces of one size and ring cannot tell latency from rate: the link is taken at its
    rate and the rest is latency."""
    samples = np.array([[6.0, 0.01, 0.02]] * 5)
    launch, hop, eff, _ = fit_allreduce(samples)
    assert (launch, hop, eff) == pytest.approx((0.01, 0.0, 1.0))

"""Hand-computable cases of the flow-level network and the collectives built on it."""

from __future__ import annotations

import numpy as np
import pytest

from lina.sim.collectives import (
    all_to_all,
    all_to_all_matrix,
    hierarchical_allreduce,
    ring_allreduce,
    ring_allreduce_time,
)
from lina.sim.infer import a2a_bottleneck_time
from lina.sim.maxmin import max_min_rates
from lina.sim.network import FlowNetwork, Transfer, make_phase
from lina.sim.spec import ClusterSpec, CpuHostModel
from lina.sim.topology import FlowClass, Topology

GB = 1e9


def bare(hosts=2, gpus=1, link_gbps=8.0, **kw) -> ClusterSpec:
    """No latencies, so times are bytes / rates exactly. 8 Gb/s = 1 GB/s."""
    return ClusterSpec(
        hosts=hosts, gpus_per_host=gpus, link_gbps=link_gbps, launch_s=0, per_peer_s=0, hop_latency_s=0, **kw
    )


def drain(net: FlowNetwork) -> dict[int, float]:
    """Run ``net`` until idle; end time of each transfer id."""
    ends = {}
    while net.busy():
        t = net.next_event_time()
        for tid in net.advance_to(t):
            ends[tid] = t
    return ends


def run(capacity, transfers) -> list[float]:
    net = FlowNetwork(capacity)
    ids = [net.start(t) for t in transfers]
    ends = drain(net)
    return [ends[i] for i in ids]


def flows(topo: Topology, pairs: list[tuple[int, int, float]], name="f") -> Transfer:
    src, dst, size = zip(*pairs)
    classes = topo.classes(np.array(src), np.array(dst), np.array(size))
    return Transfer(name, (make_phase(classes, 0.0, topo.n_resources),))


# ------------------------------------------------------------------ max-min solver
def test_max_min_textbook_example():
    # link A (cap 1) carries f0, f1; link B (cap 2) carries f1, f2 -> 0.5, 0.5, 1.5
    usage = np.array([[1, 0], [1, 1], [0, 1]], dtype=float)
    rates = max_min_rates(usage, np.array([1.0, 2.0]), np.ones(3))
    np.testing.assert_allclose(rates, [0.5, 0.5, 1.5])


def test_max_min_weights_and_counts():
    usage = np.array([[1.0], [1.0]])
    np.testing.assert_allclose(max_min_rates(usage, np.array([4.0]), np.array([1.0, 3.0])), [1.0, 3.0])
    # a class of 3 member flows and a single flow: 4 equal members share the link
    usage = np.array([[3.0], [1.0]])
    np.testing.assert_allclose(max_min_rates(usage, np.array([4.0]), np.ones(2)), [1.0, 1.0])


# ------------------------------------------------------------------ single flows
def test_one_flow_runs_at_link_rate():
    topo = Topology(bare(), representative=False)
    (end,) = run(topo.capacity, [flows(topo, [(0, 1, 3 * GB)])])
    assert end == pytest.approx(3.0)


def test_link_efficiency_scales_the_rate():
    topo = Topology(bare(link_efficiency=0.5), representative=False)
    (end,) = run(topo.capacity, [flows(topo, [(0, 1, 1 * GB)])])
    assert end == pytest.approx(2.0)


def test_two_flows_share_a_nic_then_the_survivor_speeds_up():
    topo = Topology(bare(hosts=3), representative=False)
    a, b = run(topo.capacity, [flows(topo, [(0, 1, 1 * GB)], "a"), flows(topo, [(0, 2, 3 * GB)], "b")])
    # both at 0.5 GB/s until a is done at t=2 (1 GB); b then has 2 GB left at 1 GB/s
    assert a == pytest.approx(2.0)
    assert b == pytest.approx(4.0)


def test_intra_host_flow_uses_nvlink_not_the_nic():
    c = bare(hosts=2, gpus=2, nvlink_gbps=80.0)  # 10 GB/s inside a host
    topo = Topology(c, representative=False)
    fast, slow = run(topo.capacity, [flows(topo, [(0, 1, 1 * GB)], "in"), flows(topo, [(0, 2, 1 * GB)], "out")])
    assert fast == pytest.approx(0.1)
    assert slow == pytest.approx(1.0)


# ------------------------------------------------------------------ collectives
@pytest.mark.parametrize("hosts,gpus", [(4, 1), (2, 2), (4, 4)])
def test_ring_allreduce_matches_the_formula(hosts, gpus):
    c = ClusterSpec(hosts=hosts, gpus_per_host=gpus, link_gbps=8.0, launch_s=1e-4, per_peer_s=0, hop_latency_s=1e-5)
    n = c.gpus
    topo = Topology(c)
    nbytes = 0.4 * GB
    formula = ring_allreduce_time(nbytes, n, c.nic_bytes_per_s, c.hop_latency_s, c.launch_s)
    stepwise = run(topo.capacity, [ring_allreduce(topo, 1, n, nbytes, stepwise=True)])[0]
    fluid = run(topo.capacity, [ring_allreduce(topo, 1, n, nbytes)])[0]
    assert stepwise == pytest.approx(formula, rel=1e-9)
    assert fluid == pytest.approx(formula, rel=1e-9)
    # 2 (N-1)/N * S / B + latencies, spelled out
    assert formula == pytest.approx(1e-4 + 2 * (n - 1) * (1e-5 + nbytes / n / GB))


def test_ring_channels_use_every_nic():
    one = bare(hosts=4, gpus=4, nics_per_host=1)
    four = bare(hosts=4, gpus=4, nics_per_host=4)
    t1 = run(Topology(one).capacity, [ring_allreduce(Topology(one), 1, 16, GB)])[0]
    t4 = run(Topology(four).capacity, [ring_allreduce(Topology(four), 1, 16, GB)])[0]
    assert t4 == pytest.approx(t1 / 4)


def test_hierarchical_allreduce_phases():
    c = bare(hosts=4, gpus=4, nvlink_gbps=80.0)
    topo = Topology(c)
    s = 0.8 * GB
    t = run(topo.capacity, [hierarchical_allreduce(topo, 1, 16, s)])[0]
    intra = 3 / 4 * s / (10 * GB)  # reduce-scatter in the host, 4 members, NVLink
    inter = 4 * (2 * 3 / 4 * s / 4) / GB  # 4 rings (one per local GPU) of S/4 share the host's one NIC
    assert t == pytest.approx(2 * intra + inter)


def test_uniform_all_to_all_time():
    c = bare(hosts=4, gpus=4)
    topo = Topology(c)
    s = 0.64 * GB
    (t,) = run(topo.capacity, [all_to_all(topo, 16, s)])
    # every host's NIC sends 4 GPUs x 12/16 of their bytes
    assert t == pytest.approx(4 * s * 12 / 16 / GB)


def test_hot_receiver_sets_the_all_to_all_time():
    c = bare(hosts=4, gpus=1)
    topo = Topology(c, representative=False)
    traffic = np.full((4, 4), 0.1 * GB)
    traffic[:, 0] = 0.5 * GB  # everybody sends 5x more to rank 0
    np.fill_diagonal(traffic, 0.0)
    (t,) = run(topo.capacity, [all_to_all_matrix(topo, traffic)])
    hot = 3 * 0.5 * GB / GB  # rank 0's NIC receives 1.5 GB
    assert t == pytest.approx(hot)
    assert a2a_bottleneck_time(c, traffic) == pytest.approx(hot)
    # without the hot receiver the same all-to-all is 3x faster
    cool = np.full((4, 4), 0.1 * GB)
    np.fill_diagonal(cool, 0.0)
    assert run(topo.capacity, [all_to_all_matrix(topo, cool)])[0] == pytest.approx(0.3)


def test_hierarchical_a2a_moves_the_same_inter_host_bytes():
    c = bare(hosts=4, gpus=4, nvlink_gbps=800.0)
    topo = Topology(c)
    s = 0.64 * GB
    flat = run(topo.capacity, [all_to_all(topo, 16, s)])[0]
    hier = run(topo.capacity, [all_to_all(topo, 16, s, algorithm="hierarchical")])[0]
    intra = s * 3 / 4 / (100 * GB)
    assert hier == pytest.approx(flat + intra)


# ------------------------------------------------------------------ contention and fairness
def test_all_to_all_slowed_by_a_concurrent_allreduce():
    c = bare(hosts=4, gpus=1)
    topo = Topology(c)
    alone = run(topo.capacity, [all_to_all(topo, 4, 1 * GB)])[0]
    together, _ = run(topo.capacity, [all_to_all(topo, 4, 1 * GB), ring_allreduce(topo, 1, 4, 2 * GB)])
    assert alone == pytest.approx(0.75)
    # per-collective fairness: half the NIC each while both run
    assert together == pytest.approx(1.5)


def test_flow_fairness_lets_many_flows_crowd_out_a_ring():
    topo = Topology(bare(hosts=4, gpus=4, fairness="flow"))
    alone = run(topo.capacity, [all_to_all(topo, 16, 1 * GB)])[0]
    together, _ = run(topo.capacity, [all_to_all(topo, 16, 1 * GB), ring_allreduce(topo, 1, 16, 4 * GB)])
    # 48 a2a flows against 1 ring flow per NIC: the a2a barely notices
    assert together < alone * 1.05
    topo_c = Topology(bare(hosts=4, gpus=4))
    together_c, _ = run(topo_c.capacity, [all_to_all(topo_c, 16, 1 * GB), ring_allreduce(topo_c, 1, 16, 4 * GB)])
    assert together_c > alone * 1.9


# ------------------------------------------------------------------ symmetry reduction
# the emulated cluster's limits
CALIBRATED = {"host": CpuHostModel(rank_copy_gbps=3.0, flow_copy_gbps=2.0, copy_intra=False, pair_flow_loss=0.05)}


@pytest.mark.parametrize(
    "hosts,gpus,nics,ep,limits",
    [
        (2, 2, 1, 4, {}),
        (4, 2, 1, 4, {}),
        (4, 2, 2, 8, {}),
        (4, 4, 1, 2, {}),
        (2, 2, 1, 4, CALIBRATED),
        (4, 2, 1, 8, CALIBRATED),
    ],
)
def test_representative_host_equals_full_simulation(hosts, gpus, nics, ep, limits):
    c = ClusterSpec(hosts=hosts, gpus_per_host=gpus, link_gbps=8.0, nics_per_host=nics, nvlink_gbps=40.0, **limits)
    times = []
    for representative in (True, False):
        topo = Topology(c, representative=representative)
        transfers = [
            all_to_all(topo, ep, 0.3 * GB),
            ring_allreduce(topo, 1, c.gpus, 0.5 * GB),
            ring_allreduce(topo, ep, c.gpus // ep, 0.2 * GB),
        ]
        times.append(run(topo.capacity, transfers))
    np.testing.assert_allclose(times[0], times[1], rtol=1e-9)


def test_representative_topology_rejects_other_hosts_flows():
    topo = Topology(bare(hosts=2, gpus=2))
    with pytest.raises(ValueError):
        topo.classes(np.array([2]), np.array([0]), 1.0)
    assert topo.classes(np.array([0]), np.array([0]), 1.0) == []
    assert isinstance(topo.classes(np.array([0]), np.array([3]), 1.0)[0], FlowClass)


def test_compute_slows_while_a_transfer_is_in_flight():
    """1 s of work beside a 0.4 s transfer at half speed: 0.2 s of work done by 0.4 s, the other
    0.8 s at full speed, so it ends at 1.2 s."""
    from lina.sim.engine import Executor, Task

    topo = Topology(ClusterSpec(hosts=2, gpus_per_host=1, link_gbps=8.0, launch_s=0.0, per_peer_s=0.0))
    flow = flows(topo, [(0, 1, 0.4e9)])  # 0.4 GB at 1 GB/s
    tasks = [Task("work", "compute", "compute", duration_s=1.0), Task("send", "a2a", "a2a", transfer=flow)]
    rate = lambda ex: 0.5 if ex.stream_busy("a2a") else 1.0  # noqa: E731
    Executor(tasks, FlowNetwork(topo.capacity), {"compute": 1, "a2a": 1}, compute_rate=rate).run()
    assert tasks[1].end_s == pytest.approx(0.4)
    assert tasks[0].end_s == pytest.approx(1.2)
    with pytest.raises(ValueError, match="compute rate"):
        Executor(
            [Task("w", "compute", "compute", duration_s=1.0)],
            FlowNetwork(topo.capacity),
            {"compute": 1},
            compute_rate=lambda ex: 0.0,
        ).run()


def test_a_rank_copy_limit_bounds_what_each_gpu_sends():
    """1 GB/s links, GPUs that send at most 0.5 GB/s of all-to-all traffic: 0.4 GB to another
    host takes 0.8 s, and so does 0.4 GB to the GPU next to it (10 GB/s); flows not marked as
    all-to-all traffic are not limited; two GPUs of one host each have their own limit, and then
    share the 1 GB/s link."""
    topo = Topology(
        bare(hosts=2, gpus=2, nvlink_gbps=80.0, host=CpuHostModel(rank_copy_gbps=4.0)), representative=False
    )
    assert topo.resource_name(topo.copy_base + 3) == "h1.gpu1.copy"

    def a2a(pairs, copy=True):
        src, dst, size = zip(*pairs)
        return Transfer(
            "a2a",
            (make_phase(topo.classes(np.array(src), np.array(dst), np.array(size), copy=copy), 0.0, topo.n_resources),),
        )

    assert run(topo.capacity, [a2a([(0, 2, 0.4 * GB)])]) == pytest.approx([0.8])
    assert run(topo.capacity, [a2a([(0, 1, 0.4 * GB)])]) == pytest.approx([0.8])
    assert run(topo.capacity, [a2a([(0, 2, 0.4 * GB)], copy=False)]) == pytest.approx([0.4])
    assert run(topo.capacity, [a2a([(0, 2, 0.4 * GB), (1, 3, 0.4 * GB)])]) == pytest.approx([0.8])
    # one GPU sending to two peers shares its own limit: 0.25 GB/s each
    assert run(topo.capacity, [a2a([(0, 1, 0.4 * GB), (0, 2, 0.4 * GB)])]) == pytest.approx([1.6])


def test_a_flow_cap_bounds_each_flow_between_hosts_only():
    """1 GB/s links, each all-to-all flow between hosts capped at 0.25 GB/s: one 0.5 GB flow
    takes 2 s, two flows from one GPU to two hosts run side by side at their caps (2 s), a flow
    to the GPU next door is not capped (NVLink, 10 GB/s), nor is traffic not marked all-to-all."""
    topo = Topology(
        bare(hosts=3, gpus=2, nvlink_gbps=80.0, host=CpuHostModel(flow_copy_gbps=2.0)), representative=False
    )

    def a2a(pairs, copy=True):
        src, dst, size = zip(*pairs)
        return Transfer(
            "a2a",
            (make_phase(topo.classes(np.array(src), np.array(dst), np.array(size), copy=copy), 0.0, topo.n_resources),),
        )

    assert run(topo.capacity, [a2a([(0, 2, 0.5 * GB)])]) == pytest.approx([2.0])
    assert run(topo.capacity, [a2a([(0, 2, 0.5 * GB), (0, 4, 0.5 * GB)])]) == pytest.approx([2.0])
    assert run(topo.capacity, [a2a([(0, 1, 0.5 * GB)])]) == pytest.approx([0.05])
    assert run(topo.capacity, [a2a([(0, 2, 0.5 * GB)], copy=False)]) == pytest.approx([0.5])
    # five capped flows out of one host would take 1.25 GB/s: the 1 GB/s link binds first
    five = [(0, 2, 0.2 * GB), (0, 3, 0.2 * GB), (0, 4, 0.2 * GB), (1, 5, 0.2 * GB), (1, 2, 0.2 * GB)]
    assert run(topo.capacity, [a2a(five)]) == pytest.approx([1.0])


def test_loopback_flows_can_skip_the_copy_limit():
    """Without ``copy_intra``, a flow to the GPU next door is bound by the intra-host rate alone
    (0.4 GB at 10 GB/s: 0.04 s) while a flow to another host still pays the 0.5 GB/s copy limit,
    and a GPU sending both keeps its copy limit for the remote one only."""
    host = CpuHostModel(rank_copy_gbps=4.0, copy_intra=False)
    topo = Topology(bare(hosts=2, gpus=2, nvlink_gbps=80.0, host=host), representative=False)

    def a2a(pairs):
        src, dst, size = zip(*pairs)
        return Transfer(
            "a2a",
            (make_phase(topo.classes(np.array(src), np.array(dst), np.array(size), copy=True), 0.0, topo.n_resources),),
        )

    assert run(topo.capacity, [a2a([(0, 1, 0.4 * GB)])]) == pytest.approx([0.04])
    assert run(topo.capacity, [a2a([(0, 2, 0.4 * GB)])]) == pytest.approx([0.8])
    assert run(topo.capacity, [a2a([(0, 1, 0.4 * GB), (0, 2, 0.4 * GB)])]) == pytest.approx([0.8])
    classes = topo.classes(np.array([0, 0]), np.array([1, 2]), np.array([1.0, 1.0]), copy=True)
    assert sorted(fc.intra for fc in classes) == [False, True]


def test_flows_between_the_same_two_hosts_lose_goodput():
    """A 10% loss per extra flow between two hosts: one 1 GB flow on a 1 GB/s link takes 1 s;
    two flows of one all-to-all between the same hosts (0.5 GB each) move at 0.9 GB/s together
    (1.11 s); two flows to two different hosts lose nothing; traffic not marked all-to-all pays
    nothing either."""
    topo = Topology(
        bare(hosts=3, gpus=2, nvlink_gbps=80.0, host=CpuHostModel(pair_flow_loss=0.1)), representative=False
    )

    def a2a(pairs, copy=True):
        src, dst, size = zip(*pairs)
        return Transfer(
            "a2a",
            (make_phase(topo.classes(np.array(src), np.array(dst), np.array(size), copy=copy), 0.0, topo.n_resources),),
        )

    assert run(topo.capacity, [a2a([(0, 2, GB)])]) == pytest.approx([1.0])
    assert run(topo.capacity, [a2a([(0, 2, 0.5 * GB), (1, 3, 0.5 * GB)])]) == pytest.approx([1.0 / 0.9])
    assert run(topo.capacity, [a2a([(0, 2, 0.5 * GB), (0, 4, 0.5 * GB)])]) == pytest.approx([1.0])
    assert run(topo.capacity, [a2a([(0, 2, 0.5 * GB), (1, 3, 0.5 * GB)], copy=False)]) == pytest.approx([1.0])
    with pytest.raises(Exception, match="pair_flow_loss"):
        bare(host=CpuHostModel(pair_flow_loss=1.0))


def test_loopback_flows_have_a_kind_of_their_own():
    """``set_speed("a2a-intra", 0.5)`` halves a loopback flow (0.4 GB at 10 GB/s: 0.08 s) and
    leaves a flow of the same all-to-all to another host alone (1 GB/s link: 0.4 s); an
    allreduce's flow inside a host follows ``set_speed("allreduce", ...)``."""
    topo = Topology(bare(hosts=2, gpus=2, nvlink_gbps=80.0), representative=False)
    net = FlowNetwork(topo.capacity)
    net.set_speed("a2a-intra", 0.5)
    classes = topo.classes(np.array([0]), np.array([1]), np.array([0.4 * GB]), copy=True)
    inside = net.start(Transfer("in", (make_phase(classes, 0.0, topo.n_resources),)), kind="a2a")
    classes = topo.classes(np.array([0]), np.array([2]), np.array([0.4 * GB]), copy=True)
    across = net.start(Transfer("out", (make_phase(classes, 0.0, topo.n_resources),)), kind="a2a")
    ends = drain(net)
    assert ends[inside] == pytest.approx(0.08) and ends[across] == pytest.approx(0.4)
    # without a speed of their own, flows inside a host move at their transfer's kind's speed
    net = FlowNetwork(topo.capacity)
    net.set_speed("allreduce", 0.5)
    inside = net.start(
        Transfer(
            "in", (make_phase(topo.classes(np.array([0]), np.array([1]), np.array([0.4 * GB])), 0.0, topo.n_resources),)
        ),
        kind="allreduce",
    )
    assert drain(net)[inside] == pytest.approx(0.08)


def test_a_first_come_stream_serves_the_earlier_transfer_first():
    """Two 1 GB transfers on one 1 GB/s link, two in flight at once: on a first-come stream the
    first ends at 1 s as if alone and the second at 2 s; shared equally, both end at 2 s."""
    from lina.sim.engine import Executor, Task

    topo = Topology(bare(), representative=False)

    def ends(first_come):
        tasks = [Task(f"t{i}", "a2a", "a2a", transfer=flows(topo, [(0, 1, GB)])) for i in range(2)]
        Executor(tasks, topo.network(), {"a2a": 2}, first_come=first_come).run()
        return [t.end_s for t in tasks]

    assert ends(("a2a",)) == pytest.approx([1.0, 2.0], rel=1e-3)
    assert ends(()) == pytest.approx([2.0, 2.0])
    with pytest.raises(ValueError, match="not among the streams"):
        Executor([], topo.network(), {"a2a": 1}, first_come=("allreduce",))


def test_a_kind_of_transfer_can_be_slowed():
    """At half speed, 1 GB of allreduce takes 2 s on a 1 GB/s link, and leaves the other half of
    the link to an all-to-all beside it (0.5 GB: done at 1 s). In a step, the executor sets the
    speed: an allreduce beside 1 s of compute moves 0.5 GB in that second and the rest at full
    speed (1.5 s)."""
    from lina.sim.engine import Executor, Task

    topo = Topology(bare(), representative=False)
    net = FlowNetwork(topo.capacity)
    net.set_speed("allreduce", 0.5)
    slow = net.start(flows(topo, [(0, 1, GB)]), kind="allreduce")
    other = net.start(flows(topo, [(0, 1, 0.5 * GB)]), kind="a2a")
    ends = drain(net)
    assert ends[other] == pytest.approx(1.0) and ends[slow] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="speed"):
        net.set_speed("allreduce", 0.0)

    tasks = [
        Task("c", "compute", "compute", duration_s=1.0),
        Task("ar", "allreduce", "allreduce", transfer=flows(topo, [(0, 1, GB)])),
    ]
    Executor(
        tasks,
        topo.network(),
        {"compute": 1, "allreduce": 1},
        comm_speed=lambda ex: {"allreduce": 0.5 if ex.stream_busy("compute") else 1.0},
    ).run()
    assert tasks[1].end_s == pytest.approx(1.5)

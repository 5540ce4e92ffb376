"""The communication scheduler's rules, in one process with hand-completed fake collectives.

The fake "network" hands out ``concurrent.futures.Future`` handles that the test completes
itself, so every rule (priority, hold, credit, FIFO, errors, timeouts) is checked
deterministically. Real Gloo runs are in ``test_comm_scheduler_gloo.py``.
"""

import threading
import time
from concurrent.futures import Future

import pytest
import torch

from lina.comm.scheduler import CommError, CommScheduler, CommTimeoutError, SchedulerConfig
from lina.errors import ConfigError
from lina.obs.timeline import Timeline

QUIET_S = 0.05  # how long "nothing gets launched" is watched


class FakeNet:
    """Collectives that finish only when the test says so."""

    def __init__(self):
        self.cv = threading.Condition()
        self.launched: list[str] = []
        self.handles: dict[str, Future] = {}

    def op(self, name: str):
        def launch():
            fut = Future()
            with self.cv:
                self.launched.append(name)
                self.handles[name] = fut
                self.cv.notify_all()
            return fut

        return launch

    def wait_launched(self, n: int, timeout: float = 5.0) -> list[str]:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.launched) >= n, timeout), f"only {self.launched} launched"
            return list(self.launched)

    def finish(self, name: str, error: BaseException | None = None) -> None:
        fut = self.handles[name]
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


@pytest.fixture
def sched_net():
    tl = Timeline(rank=0)
    net = FakeNet()
    sched = CommScheduler(tl, SchedulerConfig(credit=1, timeout_s=5.0))
    yield sched, net, tl
    sched.close()


def submit(sched, net, names):
    for i, n in enumerate(names):
        sched.submit_allreduce(n, 1024, net.op(n), index=i)


def test_fifo_launch_with_credit_one(sched_net):
    sched, net, tl = sched_net
    submit(sched, net, ["g0", "g1", "g2", "g3"])
    assert net.wait_launched(1) == ["g0"]
    time.sleep(QUIET_S)
    assert net.launched == ["g0"], "a second micro-op launched while the credit was used"
    for k, name in enumerate(["g0", "g1", "g2"]):
        net.finish(name)
        assert net.wait_launched(k + 2)[-1] == f"g{k + 1}"
    net.finish("g3")
    sched.flush()
    spans = [s for s in tl.spans() if s.cat == "allreduce"]
    assert [s.name for s in sorted(spans, key=lambda s: s.start_s)] == ["g0", "g1", "g2", "g3"]
    assert [s.args["index"] for s in spans] == [0, 1, 2, 3]
    assert all(s.bytes == 1024 and s.kind == "allreduce" and s.args["queue_wait_s"] >= 0 for s in spans)
    # credit 1: spans never overlap
    ordered = sorted(spans, key=lambda s: s.start_s)
    assert all(a.end_s <= b.start_s for a, b in zip(ordered, ordered[1:]))
    assert sched.stats().max_in_flight == 1


def test_credit_window_limits_in_flight():
    net = FakeNet()
    with CommScheduler(Timeline(), SchedulerConfig(credit=3, timeout_s=5.0)) as sched:
        submit(sched, net, [f"g{i}" for i in range(7)])
        assert net.wait_launched(3) == ["g0", "g1", "g2"]
        time.sleep(QUIET_S)
        assert len(net.launched) == 3
        net.finish("g1")  # completes out of order: frees one credit, next in FIFO goes
        assert net.wait_launched(4)[-1] == "g3"
        for k, (name, nxt) in enumerate([("g0", "g4"), ("g2", "g5"), ("g3", "g6")]):
            net.finish(name)
            assert net.wait_launched(5 + k)[-1] == nxt
            time.sleep(0.005)
            assert len(net.launched) == 5 + k
        for name in ["g4", "g5", "g6"]:
            net.finish(name)
        sched.flush()
        assert net.launched == [f"g{i}" for i in range(7)]
        assert sched.stats().max_in_flight == 3


def test_flush_opens_a_wider_credit_window():
    """During backward one micro-op at a time; once flush() runs (no all-to-all left in the step)
    up to flush_credit go at once."""
    net = FakeNet()
    with CommScheduler(Timeline(), SchedulerConfig(credit=1, flush_credit=3, timeout_s=5.0)) as sched:
        submit(sched, net, [f"g{i}" for i in range(5)])
        assert net.wait_launched(1) == ["g0"]
        time.sleep(QUIET_S)
        assert len(net.launched) == 1
        flusher = threading.Thread(target=sched.flush)
        flusher.start()
        assert net.wait_launched(3) == ["g0", "g1", "g2"]
        time.sleep(QUIET_S)
        assert len(net.launched) == 3
        for i in range(5):
            if i >= 3:
                net.wait_launched(i + 1)
            net.finish(f"g{i}")
        flusher.join(5)
        assert not flusher.is_alive() and sched.stats().max_in_flight == 3


def test_no_allreduce_launch_while_a2a_waits_or_runs(sched_net):
    sched, net, tl = sched_net
    submit(sched, net, ["before"])
    net.wait_launched(1)
    with sched.a2a("combine", 4096):
        submit(sched, net, ["g0", "g1"])
        net.finish("before")  # the running micro-op is not preempted; the next one waits
        time.sleep(QUIET_S)
        assert net.launched == ["before"]
    assert net.wait_launched(2)[-1] == "g0"
    net.finish("g0")
    net.wait_launched(3)
    net.finish("g1")
    sched.flush()
    a2a = [s for s in tl.spans() if s.name.startswith("a2a-slot:")]
    assert len(a2a) == 1 and a2a[0].bytes == 4096 and a2a[0].kind == "a2a_slot"
    launched_after = [s.start_s for s in tl.spans() if s.name in ("g0", "g1")]
    assert min(launched_after) >= a2a[0].end_s


def test_a2a_begin_end_for_asynchronous_all_to_all(sched_net):
    sched, net, tl = sched_net
    first = sched.a2a_begin("dispatch", 64, index=0)
    second = sched.a2a_begin("dispatch", 64, index=1)  # two micro-ops in flight (pipelining)
    submit(sched, net, ["g0"])
    sched.a2a_end(first)
    time.sleep(QUIET_S)
    assert net.launched == [], "launched while the second all-to-all micro-op was running"
    sched.a2a_end(second)
    net.wait_launched(1)
    net.finish("g0")
    sched.flush()
    with pytest.raises(CommError, match="a2a_end"):
        sched.a2a_end(second)
    assert [s.args["index"] for s in tl.spans() if s.name.startswith("a2a-slot:")] == [0, 1]


def test_hold_blocks_until_next_a2a_completes(sched_net):
    sched, net, tl = sched_net
    with sched.a2a("running-before-hold", 8):
        sched.hold()
    submit(sched, net, ["g0"])
    time.sleep(QUIET_S)
    assert net.launched == [], "an all-to-all entered before hold() released it"
    with sched.a2a("next", 8):
        time.sleep(0.01)
    assert net.wait_launched(1) == ["g0"]
    net.finish("g0")
    sched.flush()
    hold = [s for s in tl.spans() if s.name == "hold"]
    nxt = [s for s in tl.spans() if s.name == "a2a-slot:next"][0]
    assert len(hold) == 1 and hold[0].cat == "sched"
    assert [s for s in tl.spans() if s.name == "g0"][0].start_s >= nxt.end_s


def test_flush_releases_hold_and_waits_for_completion(sched_net):
    sched, net, _ = sched_net
    sched.hold()
    submit(sched, net, ["g0", "g1"])
    time.sleep(QUIET_S)
    assert net.launched == []

    def finisher():
        for k, name in enumerate(["g0", "g1"]):
            net.wait_launched(k + 1)
            time.sleep(0.01)
            net.finish(name)

    t = threading.Thread(target=finisher)
    t.start()
    sched.flush()
    t.join()
    s = sched.stats()
    assert (s.allreduce_submitted, s.allreduce_launched, s.allreduce_done) == (2, 2, 2)


def test_drain_waits_for_in_flight_then_gives_up_after_drain_timeout():
    net = FakeNet()
    tl = Timeline()
    with CommScheduler(tl, SchedulerConfig(drain=True, drain_timeout_s=0.3, timeout_s=5.0)) as sched:
        submit(sched, net, ["g0", "g1"])
        net.wait_launched(1)
        threading.Timer(0.05, net.finish, args=("g0",)).start()
        with sched.a2a("drained", 8):
            assert net.handles["g0"].done()
        net.wait_launched(2)
        with sched.a2a("not-drained", 8):  # g1 never finishes in time
            pass
        net.finish("g1")
        sched.flush()
    spans = {s.name.removeprefix("a2a-slot:"): s for s in tl.spans() if s.name.startswith("a2a-slot:")}
    assert spans["drained"].args["drained"] is True and spans["drained"].args["queue_wait_s"] > 0
    assert spans["not-drained"].args["drained"] is False
    assert 0.25 <= spans["not-drained"].args["queue_wait_s"] < 2.0


def test_launch_error_is_raised_by_flush_and_later_calls(sched_net):
    sched, net, _ = sched_net

    def bad_launch():
        raise RuntimeError("connection reset")

    sched.submit_allreduce("bad", 8, bad_launch)
    with pytest.raises(CommError, match="bad") as info:
        sched.flush()
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(CommError):
        sched.submit_allreduce("later", 8, net.op("later"))
    with pytest.raises(CommError):
        with sched.a2a("later", 8):
            pass


def test_failed_collective_future_is_surfaced(sched_net):
    sched, net, tl = sched_net
    submit(sched, net, ["g0", "g1"])
    net.wait_launched(1)
    net.finish("g0", RuntimeError("peer closed the connection"))
    with pytest.raises(CommError, match="peer closed"):
        sched.flush()
    assert net.launched == ["g0"], "launched more micro-ops after a failure"
    assert [s.args.get("error") for s in tl.spans() if s.cat == "allreduce"] == [True]


def test_flush_times_out_instead_of_hanging(sched_net):
    sched, net, _ = sched_net
    submit(sched, net, ["never"])
    t0 = time.perf_counter()
    with pytest.raises(CommTimeoutError, match="never"):
        sched.flush(timeout_s=0.2)
    assert time.perf_counter() - t0 < 2.0


def test_torch_future_and_wait_only_handles():
    class WaitOnly:
        def __init__(self, error=None):
            self.error = error

        def wait(self):
            time.sleep(0.005)
            if self.error:
                raise self.error

    tl = Timeline()
    with CommScheduler(tl, SchedulerConfig(credit=2, timeout_s=5.0)) as sched:
        fut = torch.futures.Future()
        sched.submit_allreduce("torch", 8, lambda: fut)
        sched.submit_allreduce("wait-only", 8, WaitOnly)
        sched.submit_allreduce("sync", 8, lambda: None)
        threading.Timer(0.02, fut.set_result, args=(None,)).start()
        sched.flush()
        assert sched.stats().allreduce_done == 3
        sched.submit_allreduce("wait-fails", 8, lambda: WaitOnly(RuntimeError("gloo timeout")))
        with pytest.raises(CommError, match="gloo timeout"):
            sched.flush()
    with CommScheduler(Timeline(), SchedulerConfig(timeout_s=5.0)) as sched:
        fut = torch.futures.Future()
        sched.submit_allreduce("torch-fails", 8, lambda: fut)
        fut.set_exception(RuntimeError("Connection closed by peer"))
        with pytest.raises(CommError, match="Connection closed"):
            sched.flush()
    with CommScheduler(Timeline(), SchedulerConfig(timeout_s=5.0)) as sched:
        sched.submit_allreduce("no-handle", 8, lambda: 42)
        with pytest.raises(CommError, match="neither"):
            sched.flush()


def test_a2a_body_error_propagates_and_releases_priority(sched_net):
    sched, net, tl = sched_net
    with pytest.raises(ValueError):
        with sched.a2a("boom", 8):
            raise ValueError("bad split sizes")
    submit(sched, net, ["g0"])
    net.wait_launched(1)
    net.finish("g0")
    sched.flush()
    assert [s.args.get("error") for s in tl.spans() if s.name.startswith("a2a-slot:")] == [True]


def test_close_returns_with_work_in_flight_and_rejects_new_work():
    net = FakeNet()
    sched = CommScheduler(Timeline(), SchedulerConfig(timeout_s=5.0))
    submit(sched, net, ["stuck", "queued"])
    net.wait_launched(1)
    t0 = time.perf_counter()
    sched.close()
    assert time.perf_counter() - t0 < 1.0
    assert not sched._thread.is_alive()
    with pytest.raises(CommError, match="closed"):
        sched.submit_allreduce("x", 8, net.op("x"))


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="credit"):
        SchedulerConfig(credit=0)
    with pytest.raises(ConfigError, match="timeout_s"):
        SchedulerConfig(timeout_s=0)
    with pytest.raises(ConfigError, match="drain_timeout_s"):
        SchedulerConfig(drain_timeout_s=-1)
    with pytest.raises(ConfigError, match="drain"):
        SchedulerConfig(drain="yes")


def test_scheduler_cpu_overhead_per_micro_op_is_small():
    """Own CPU cost (scheduler thread minus the launches, plus completion callbacks)."""
    n = 3000
    for label, make in [("sync", lambda: None), ("future", lambda: _done_future())]:
        with CommScheduler(Timeline(), SchedulerConfig(credit=1, timeout_s=30.0)) as sched:
            for i in range(n):
                sched.submit_allreduce("g", 4, make, index=i)
            sched.flush()
            s = sched.stats()
        per_op = s.own_cpu_per_op_s
        print(
            f"scheduler own CPU per micro-op ({label} completion, in-process): {per_op * 1e6:.1f} us "
            f"(thread {s.thread_cpu_s * 1e3:.1f} ms, launches {s.launch_cpu_s * 1e3:.1f} ms, "
            f"callbacks {s.callback_cpu_s * 1e3:.1f} ms over {s.allreduce_done} ops)"
        )
        assert s.allreduce_done == n
        assert 0 < per_op < 1e-3


def _done_future():
    fut = Future()
    fut.set_result(None)
    return fut

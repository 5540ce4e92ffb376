"""Lina's per-rank communication scheduler: all-to-all first, allreduce in micro-ops.

A framework-agnostic core (no model and no torch knowledge, like ByteScheduler's
bytecore). In the backward pass of an MoE model the all-to-all of layer i shares link
bandwidth with the allreduce of later layers' gradients; the all-to-all blocks compute,
the allreduce does not. The scheduler keeps a FIFO queue of allreduce micro-ops (one per
gradient chunk, see :mod:`lina.comm.partition`) and launches one only when

* fewer than ``credit`` allreduce micro-ops are in flight (credit window, default 1);
* no all-to-all is waiting or running (all-to-all has priority; a launched micro-op is
  never preempted, the next one waits: preemption at micro-op boundaries);
* no :meth:`CommScheduler.hold` is pending (backward reached a MoE layer's combine, so an
  all-to-all is about to come; released when that next all-to-all completes).

All-to-alls are run by the caller's thread (they are synchronous inside the model's
autograd functions): ``with sched.a2a(name, nbytes): <all_to_all>`` marks one waiting and
then running. Allreduce micro-ops are launched by one scheduler thread, strictly in
submission order, so every rank of a data-parallel group issues the same collectives in
the same order whatever its local timing: scheduling stays local, no rank coordinates.

Requirements on the caller (else ranks deadlock or pair the wrong messages):

* all-to-alls and allreduce micro-ops use *different* process groups (a backend such as
  Gloo pairs the collectives of one group by their issue order, which differs per rank);
* every rank submits the same allreduce micro-ops in the same order and runs the same
  sequence of all-to-alls.

Completion is event driven: a launched op's handle reports completion through a callback
(``handle.get_future().add_done_callback`` for a torch ``Work``, or ``add_done_callback``
on a future) or, for a handle with only ``wait()``, through one waiter thread that waits
on handles in launch order. Nobody polls or sleeps; the scheduler thread sleeps on a
condition variable. Its own CPU cost is reported by :meth:`CommScheduler.stats`.

Every all-to-all and allreduce micro-op is recorded as a span in the
:class:`lina.obs.timeline.Timeline` given (cat ``"a2a"`` / ``"allreduce"``; args
``bytes``, ``index``, ``seq``, ``queue_wait_s``); each :meth:`~CommScheduler.hold` as an
instant ``"sched"`` span named ``"hold"``.

On NCCL a ``Work``'s future completes when the collective is *enqueued* on its stream,
not when it finishes; there the launch callable should return a handle whose ``wait()``
blocks the CPU until the device is done (e.g. one that synchronizes a CUDA event recorded
after the collective), so that the credit window counts real in-flight traffic.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from lina.errors import ConfigError, LinaError
from lina.obs import schema
from lina.obs.timeline import Timeline

A2A = "a2a"
ALLREDUCE = "allreduce"


class CommError(LinaError):
    """A launched communication failed (a peer died, a connection broke, launch raised)."""


class CommTimeoutError(CommError):
    """Communication did not complete within the scheduler's ``timeout_s``."""


@dataclass
class SchedulerConfig:
    """Settings of one rank's scheduler, validated on construction.

    Args:
        credit: allreduce micro-ops allowed in flight at once (ByteScheduler's credit).
        drain: before an all-to-all starts, wait for the in-flight allreduce micro-ops to
            finish, so the all-to-all does not share the link with them.
        drain_timeout_s: longest such wait. The wait must be bounded: a micro-op launched
            here completes only once every peer launched it too, and a peer that already
            waits for this all-to-all launches nothing (deadlock if the wait were unbounded).
            After it the all-to-all starts anyway (span arg ``drained=False``).
        timeout_s: longest :meth:`CommScheduler.flush` waits before raising
            :class:`CommTimeoutError` (a peer that stalls or died silently).
        name: the scheduler thread's name, also the ``thread`` of allreduce spans.
        flush_credit: allreduce micro-ops in flight once :meth:`CommScheduler.flush` runs (end
            of backward: no all-to-all of this step is left to protect); at least ``credit``.
    """

    credit: int = 1
    drain: bool = False
    drain_timeout_s: float = 0.1
    timeout_s: float = 300.0
    name: str = "comm-sched"
    flush_credit: int = 0  # 0: same as credit

    def __post_init__(self) -> None:
        if isinstance(self.credit, bool) or not isinstance(self.credit, int) or self.credit < 1:
            raise ConfigError(
                "credit",
                f"{self.credit!r} is not a positive integer",
                "allow at least 1 allreduce micro-op in flight (Lina: 1)",
            )
        if not isinstance(self.flush_credit, int) or self.flush_credit < 0:
            raise ConfigError(
                "flush_credit",
                f"{self.flush_credit!r} is not a non-negative integer",
                "use 0 (same as credit) or a count >= credit",
            )
        self.flush_credit = max(self.flush_credit, self.credit)
        if not isinstance(self.drain, bool):
            raise ConfigError("drain", f"{self.drain!r} is not a bool", "use true or false")
        for key in ("drain_timeout_s", "timeout_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(key, f"{value!r} is not a positive number of seconds", f"set {key} > 0")


@dataclass
class MicroOp:
    """One communication micro-op.

    Args:
        kind: ``"a2a"`` or ``"allreduce"``.
        name: label of the tensor / layer, e.g. ``"blocks.3.attn.qkv.weight"``.
        nbytes: bytes this micro-op moves (its chunk size).
        launch: allreduce only: starts the communication and returns a handle (torch
            ``Work``, a future, an object with ``wait()``) or ``None`` when already done.
        index: micro-op index within its tensor (chunk number) or all-to-all (piece number).
        seq: submission number on this scheduler (allreduce and all-to-all count apart).

    Filled in by the scheduler (``time.perf_counter()`` seconds): ``submit_s`` (queued /
    all-to-all entered), ``start_s`` (launched / all-to-all body starts), ``end_s``
    (completion seen), ``drained`` (all-to-all with drain: whether the in-flight
    allreduce finished in time), ``error`` (what a failed micro-op raised).
    """

    kind: str
    name: str
    nbytes: int
    launch: Callable[[], Any] | None = None
    index: int = 0
    seq: int = 0
    submit_s: float = 0.0
    start_s: float | None = None
    end_s: float | None = None
    drained: bool | None = None
    error: BaseException | None = field(default=None, repr=False)


@dataclass
class SchedulerStats:
    """Counters and CPU cost of one scheduler since construction.

    ``thread_cpu_s`` is the scheduler thread's whole CPU time, ``launch_cpu_s`` the part
    spent inside the callers' ``launch`` callables (the collective's own enqueue cost,
    paid without a scheduler too), ``callback_cpu_s`` the completion bookkeeping run on
    the communication library's threads, ``waiter_cpu_s`` the waiter thread's CPU time.
    """

    allreduce_submitted: int
    allreduce_launched: int
    allreduce_done: int
    a2a_done: int
    max_in_flight: int
    thread_cpu_s: float
    launch_cpu_s: float
    callback_cpu_s: float
    waiter_cpu_s: float

    @property
    def own_cpu_s(self) -> float:
        """CPU time the scheduler itself burned (bookkeeping, wake-ups; not the launches)."""
        return self.thread_cpu_s - self.launch_cpu_s + self.callback_cpu_s + self.waiter_cpu_s

    @property
    def own_cpu_per_op_s(self) -> float:
        """:attr:`own_cpu_s` per completed allreduce micro-op (0 when none)."""
        return self.own_cpu_s / self.allreduce_done if self.allreduce_done else 0.0


def _thread_cpu_s(thread: threading.Thread | None) -> float:
    """CPU seconds of another live thread (0 when it is gone or never started)."""
    if thread is None or thread.ident is None or not thread.is_alive():
        return 0.0
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (OSError, AttributeError):
        return 0.0


def _future_error(fut: Any) -> BaseException | None:
    """The error a completed future holds, for ``concurrent.futures`` and torch futures."""
    exception = getattr(fut, "exception", None)
    if callable(exception):
        return exception(timeout=0)
    try:
        fut.value()
    except Exception as err:  # the collective's own failure, surfaced by flush()
        return err
    return None


class CommScheduler:
    """One rank's priority scheduler of all-to-all and allreduce micro-ops.

    Args:
        timeline: where spans go; ``None`` keeps none.
        config: :class:`SchedulerConfig` (defaults: credit 1, no drain, 300 s timeout).

    Thread safety: every method may be called from any thread (autograd hooks, the
    training loop). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, timeline: Timeline | None = None, config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()
        self.timeline = timeline if timeline is not None else Timeline(enabled=False)
        self._lock = threading.RLock()
        self._work_cv = threading.Condition(self._lock)  # wakes the scheduler thread
        self._idle_cv = threading.Condition(self._lock)  # wakes flush() and a2a drains
        self._queue: deque[MicroOp] = deque()
        self._in_flight: dict[int, MicroOp] = {}
        self._a2a_active = 0
        self._a2a_entered = 0
        self._held = False
        self._hold_seq = 0
        self._flushing = 0
        self._closed = False
        self._error: CommError | None = None
        self._submitted = self._launched = self._done = self._a2a_done = self._max_in_flight = 0
        self._launch_cpu_s = self._callback_cpu_s = 0.0
        self._final_cpu = {"thread": 0.0, "waiter": 0.0}
        self._waiter: threading.Thread | None = None
        self._wait_cv = threading.Condition(threading.Lock())
        self._wait_queue: deque[tuple[MicroOp, Any]] = deque()
        self._thread = threading.Thread(target=self._run, name=self.config.name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API

    def submit_allreduce(self, name: str, nbytes: int, launch: Callable[[], Any], index: int = 0) -> MicroOp:
        """Queue one allreduce micro-op; it is launched later, in submission order.

        Args:
            name: gradient tensor's name (span name).
            nbytes: bytes of this chunk.
            launch: starts the allreduce and returns a handle, e.g.
                ``lambda: dist.all_reduce(chunk, group=dp_group, async_op=True)``.
            index: chunk number within its tensor.

        Raises:
            CommError: an earlier micro-op failed, or the scheduler is closed.
        """
        with self._lock:
            self._check_usable()
            self._submitted += 1
            op = MicroOp(ALLREDUCE, name, int(nbytes), launch, index, self._submitted, time.perf_counter())
            self._queue.append(op)
            self._work_cv.notify()
        return op

    @contextlib.contextmanager
    def a2a(self, name: str, nbytes: int, index: int = 0, drain: bool | None = None) -> Iterator[MicroOp]:
        """Mark an all-to-all that the caller runs in the body of the ``with`` block.

        From entry until exit no allreduce micro-op is launched. With ``drain`` (default
        ``config.drain``) entry first waits, at most ``config.drain_timeout_s``, for the
        in-flight allreduce micro-ops to finish. Exit releases a :meth:`hold` made before
        entry. The span covers the body; ``queue_wait_s`` is the drain wait.

        Raises:
            CommError: an earlier allreduce micro-op failed (raised before the body runs).
        """
        op = self.a2a_begin(name, nbytes, index, drain)
        failed = True
        try:
            yield op
            failed = False
        finally:
            self.a2a_end(op, failed=failed)

    def a2a_begin(self, name: str, nbytes: int, index: int = 0, drain: bool | None = None) -> MicroOp:
        """Start of an all-to-all the caller runs itself, e.g. an asynchronous one that
        overlaps expert compute (pipelining); pair it with :meth:`a2a_end`. Same rules
        as :meth:`a2a`, which is these two calls around a ``with`` body."""
        drain = self.config.drain if drain is None else drain
        with self._lock:
            self._check_usable()
            entry = time.perf_counter()
            self._a2a_entered += 1
            op = MicroOp(A2A, name, int(nbytes), None, index, self._a2a_entered, entry)
            self._a2a_active += 1
            if drain:
                op.drained = True
                deadline = entry + self.config.drain_timeout_s
                while self._in_flight and self._error is None:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        op.drained = False
                        break
                    self._idle_cv.wait(remaining)
            op.start_s = time.perf_counter()
        return op

    def a2a_end(self, op: MicroOp, failed: bool = False) -> None:
        """The all-to-all ``op`` (from :meth:`a2a_begin`) completed; allreduce may go on.

        Raises:
            CommError: ``op`` is not an open all-to-all of this scheduler.
        """
        end = time.perf_counter()
        with self._lock:
            if op.kind != A2A or op.start_s is None or op.end_s is not None:
                raise CommError(f"a2a_end({op.name}) without a matching a2a_begin; end each all-to-all once")
            op.end_s = end
            self._a2a_active -= 1
            self._a2a_done += 1
            if self._held and op.seq > self._hold_seq:
                self._held = False
            self._work_cv.notify()
        args = {"index": op.index, "seq": op.seq, "queue_wait_s": op.start_s - op.submit_s}
        if op.drained is not None:
            args["drained"] = op.drained
        if failed:
            args["error"] = True
        # The all-to-all itself is timed by whoever runs it (cat "a2a"); here only the slot the
        # scheduler gave it, so that no span is counted twice.
        self.timeline.record(
            f"a2a-slot:{op.name}", "sched", op.start_s, op.end_s, kind=schema.A2A_SLOT, bytes=op.nbytes, **args
        )

    def hold(self) -> None:
        """Launch no new allreduce micro-op until the next all-to-all (entered after this
        call) completes. Call it when backward reaches a MoE layer's combine. A
        :meth:`flush` also releases it."""
        with self._lock:
            self._held = True
            self._hold_seq = seq = self._a2a_entered
            now = time.perf_counter()
        self.timeline.record("hold", "sched", now, now, kind=schema.HOLD, a2a_seq=seq)

    def release(self) -> None:
        """Drop a pending :meth:`hold` (when the expected all-to-all will not come)."""
        with self._lock:
            self._held = False
            self._work_cv.notify()

    def flush(self, timeout_s: float | None = None) -> None:
        """Launch everything queued (ignoring holds, still yielding to all-to-alls) and
        wait until all allreduce micro-ops complete. Call it at the end of backward.

        Args:
            timeout_s: longest wait; default ``config.timeout_s``.

        Raises:
            CommError: a micro-op failed (the first error, with the original as cause).
            CommTimeoutError: not done within the timeout (a peer stalls or is gone).
        """
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        deadline = time.perf_counter() + timeout_s
        with self._lock:
            self._check_usable()
            self._flushing += 1
            self._work_cv.notify()
            try:
                while (self._queue or self._in_flight) and self._error is None:
                    if self._closed:
                        raise CommError("the communication scheduler was closed while flush() waited")
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        raise CommTimeoutError(self._timeout_message(timeout_s))
                    self._idle_cv.wait(remaining)
            finally:
                self._flushing -= 1
            if self._error is not None:
                raise self._error
            self._held = False

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the scheduler thread; queued micro-ops that never launched are dropped.

        Waits at most ``timeout_s`` for the threads to end; never raises for pending work
        (call :meth:`flush` first to have it done or its errors raised).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.clear()
            self._work_cv.notify_all()
            self._idle_cv.notify_all()
        with self._wait_cv:
            self._wait_cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        if self._waiter is not None and self._waiter is not threading.current_thread():
            self._waiter.join(min(timeout_s, 0.5))

    def stats(self) -> SchedulerStats:
        """Counters and CPU times so far (see :class:`SchedulerStats`)."""
        with self._lock:
            return SchedulerStats(
                allreduce_submitted=self._submitted,
                allreduce_launched=self._launched,
                allreduce_done=self._done,
                a2a_done=self._a2a_done,
                max_in_flight=self._max_in_flight,
                thread_cpu_s=_thread_cpu_s(self._thread) or self._final_cpu["thread"],
                launch_cpu_s=self._launch_cpu_s,
                callback_cpu_s=self._callback_cpu_s,
                waiter_cpu_s=_thread_cpu_s(self._waiter) or self._final_cpu["waiter"],
            )

    @property
    def error(self) -> CommError | None:
        """The first failure, or ``None``."""
        return self._error

    def __enter__(self) -> "CommScheduler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise CommError("the communication scheduler is closed; create a new CommScheduler")

    def _can_launch(self) -> bool:
        return (
            bool(self._queue)
            and self._error is None
            and len(self._in_flight) < (self.config.flush_credit if self._flushing > 0 else self.config.credit)
            and self._a2a_active == 0
            and (not self._held or self._flushing > 0)
        )

    def _run(self) -> None:
        """Scheduler thread: sleep on the condition; launch micro-ops whenever allowed."""
        with self._lock:
            while True:
                while not self._closed and not self._can_launch():
                    self._work_cv.wait()
                if self._closed:
                    self._final_cpu["thread"] = time.thread_time()
                    return
                self._launch(self._queue.popleft())

    def _launch(self, op: MicroOp) -> None:
        """Start one allreduce micro-op (lock held, so no all-to-all can slip in between
        the decision and the launch)."""
        op.start_s = time.perf_counter()
        self._in_flight[op.seq] = op
        self._launched += 1
        self._max_in_flight = max(self._max_in_flight, len(self._in_flight))
        cpu0 = time.thread_time()
        try:
            handle = op.launch()
        except Exception as err:
            self._launch_cpu_s += time.thread_time() - cpu0
            self._complete(op, err)
            return
        self._launch_cpu_s += time.thread_time() - cpu0
        try:
            self._attach(op, handle)
        except Exception as err:
            self._complete(op, err)

    def _attach(self, op: MicroOp, handle: Any) -> None:
        """Arrange for :meth:`_complete` to run when the handle's communication ends."""
        if handle is None:
            self._complete(op, None)
            return
        future = None
        get_future = getattr(handle, "get_future", None)
        if callable(get_future):
            future = get_future()
        elif callable(getattr(handle, "add_done_callback", None)):
            future = handle
        if future is not None:
            future.add_done_callback(lambda fut, op=op: self._on_future(op, fut))
            return
        if not callable(getattr(handle, "wait", None)):
            raise CommError(
                f"launch of {op.name}[{op.index}] returned {type(handle).__name__}, which has neither "
                "get_future(), add_done_callback() nor wait(); return the collective's Work (async_op=True)"
            )
        with self._wait_cv:
            if self._waiter is None:
                self._waiter = threading.Thread(target=self._wait_loop, name=f"{self.config.name}-wait", daemon=True)
                self._waiter.start()
            self._wait_queue.append((op, handle))
            self._wait_cv.notify()

    def _on_future(self, op: MicroOp, fut: Any) -> None:
        """Completion callback, run on the communication library's thread."""
        cpu0 = time.thread_time()
        try:
            err = _future_error(fut)
        except Exception as exc:  # a future that cannot even report its state
            err = exc
        with self._lock:
            self._complete(op, err)
            if threading.get_ident() != self._thread.ident:  # else already in thread_cpu_s
                self._callback_cpu_s += time.thread_time() - cpu0

    def _wait_loop(self) -> None:
        """Waiter thread for handles with only ``wait()``: waits on them in launch order."""
        while True:
            with self._wait_cv:
                while not self._wait_queue and not self._closed:
                    self._wait_cv.wait()
                if not self._wait_queue:
                    self._final_cpu["waiter"] = time.thread_time()
                    return
                op, handle = self._wait_queue.popleft()
            err: BaseException | None = None
            try:
                handle.wait()
            except Exception as exc:  # the collective's own failure, surfaced by flush()
                err = exc
            with self._lock:
                self._complete(op, err)

    def _complete(self, op: MicroOp, err: BaseException | None) -> None:
        """Bookkeeping of a finished micro-op (lock held): free its credit, record its span,
        keep the first error, wake the scheduler thread and any waiter."""
        if self._in_flight.pop(op.seq, None) is None:
            return
        op.end_s = time.perf_counter()
        op.error = err
        self._done += 1
        args = {"index": op.index, "seq": op.seq, "queue_wait_s": op.start_s - op.submit_s}
        if err is not None:
            args["error"] = True
            if self._error is None:
                self._error = CommError(f"allreduce micro-op {op.name}[{op.index}] (#{op.seq}) failed: {err}")
                self._error.__cause__ = err
        self.timeline.record(
            op.name,
            ALLREDUCE,
            op.start_s,
            op.end_s,
            thread=self.config.name,
            kind=schema.ALLREDUCE,
            bytes=op.nbytes,
            **args,
        )
        self._work_cv.notify()
        self._idle_cv.notify_all()

    def _timeout_message(self, timeout_s: float) -> str:
        pending = sorted(self._in_flight.values(), key=lambda o: o.seq)
        names = ", ".join(f"{o.name}[{o.index}]" for o in pending[:4]) or "none"
        return (
            f"allreduce micro-ops not done after {timeout_s:g} s: {len(pending)} in flight ({names}), "
            f"{len(self._queue)} queued, {self._a2a_active} all-to-all running. A peer rank is stalled or "
            "gone, or the ranks submitted different micro-ops; check the other ranks' logs, or raise timeout_s"
        )

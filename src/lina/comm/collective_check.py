"""Every collective a rank issues, per process group: named when it fails, compared across ranks.

Lina reorders communication, and a backend pairs the collectives of one process group by their
issue order: two ranks that issue them in different orders hang (NCCL) or silently combine the
wrong tensors (Gloo, when sizes agree). :class:`CollectiveLog` makes both visible:

* While installed it wraps ``torch.distributed``'s collectives (``all_reduce``,
  ``all_to_all_single``, ``broadcast``, ...; called as ``dist.<op>`` from lina's code). Each call
  appends ``(op, label, signature)`` to the sequence of its process group and feeds a running
  hash of that sequence. The signature is what every member of the group must agree on: dtype and
  element count (for ``all_to_all_single`` the row shape, since row counts differ per rank). The
  label is the caller's name for it (``with collective_label("bucket3"): ...``), so two
  same-sized allreduces in swapped order differ too.
* A collective that raises (a Gloo / NCCL timeout after the group's ``timeout_s``, a lost peer)
  is re-raised as :class:`CollectiveFailed`, which names the op, its label, the group and its
  position in the step, for synchronous calls and for the ``wait()`` of asynchronous ones.
* :meth:`CollectiveLog.check_step` (``--check-collectives``) compares the per-group hashes of
  all ranks with one all-gather of ``[MAX_GROUPS, 3]`` int64 on a group of its own; on a mismatch
  (only then) it gathers the sequences, and every rank raises :class:`CollectiveOrderError`
  naming the first collective where two members of a group differ.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from lina.errors import LinaError

MAX_GROUPS = 32  # process groups one rank can be a member of and have checked
WRAPPED = (
    "all_reduce",
    "all_to_all_single",
    "all_to_all",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "reduce",
    "barrier",
)

_label = threading.local()


@contextlib.contextmanager
def collective_label(label: str) -> Iterator[None]:
    """Name the collectives this thread issues inside the block (e.g. ``"bucket3"``)."""
    old = getattr(_label, "value", "")
    _label.value = label
    try:
        yield
    finally:
        _label.value = old


class CollectiveFailed(LinaError):
    """A collective raised: the message names the op, its label, its group and its position."""


class CollectiveOrderError(LinaError):
    """Members of a process group issued different sequences of collectives in one step."""


@dataclass
class _GroupLog:
    name: str  # what the user reads: "dp (ranks 0-3)"
    ranks: list[int]
    ops: list[list] = field(default_factory=list)  # [op, label, signature] of this step
    digest: Any = field(default_factory=lambda: hashlib.blake2b(digest_size=8))


def _signature(op: str, args: tuple, kwargs: dict) -> str:
    """What every member of the group must agree on for this call."""
    tensors = [a for a in args if torch.is_tensor(a)]
    if op == "all_to_all_single" and len(tensors) >= 2:
        x = tensors[1]
        return f"{str(x.dtype).removeprefix('torch.')} rows of {list(x.shape[1:])}"
    if op == "barrier":
        return ""
    if tensors:
        x = tensors[-1] if op in ("all_gather_into_tensor", "reduce_scatter_tensor") else tensors[0]
        src = kwargs.get("src", args[1] if len(args) > 1 else None) if op == "broadcast" else None
        return f"{str(x.dtype).removeprefix('torch.')} x {x.numel()}" + (f" from rank {src}" if src is not None else "")
    lists = [a for a in args if isinstance(a, list)]
    return f"{len(lists[0])} tensors" if lists else ""


def _group_of(op: str, args: tuple, kwargs: dict):
    if "group" in kwargs:
        return kwargs["group"]
    positions = {
        "all_reduce": 2,
        "all_to_all_single": 4,
        "all_to_all": 2,
        "broadcast": 2,
        "all_gather": 2,
        "all_gather_into_tensor": 2,
        "reduce_scatter_tensor": 3,
        "reduce": 3,
        "barrier": 0,
    }
    i = positions.get(op)
    return args[i] if i is not None and len(args) > i else None


class _NamedWork:
    """An asynchronous collective's handle whose ``wait()`` names the collective when it fails."""

    def __init__(self, work, describe: Callable[[], str]):
        self._work = work
        self._describe = describe

    def wait(self, *args, **kwargs):
        try:
            return self._work.wait(*args, **kwargs)
        except RuntimeError as err:
            raise CollectiveFailed(_failure_text(self._describe(), err)) from err

    def __getattr__(self, name: str):
        return getattr(self._work, name)


def _failure_text(what: str, err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"{what} failed: {first}. Fix: a peer died, is much slower, or issued its collectives in "
        "another order (rerun with --check-collectives to compare the ranks' sequences); raise "
        "timeout_s if it is only slow"
    )


class CollectiveLog:
    """Records the collectives of this process per process group (see the module docstring).

    Use as a context manager (or :meth:`install` / :meth:`uninstall`) around training; name the
    groups with :meth:`watch` (every group this rank is a member of should be watched, so that a
    member that issued nothing on it is caught too).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._groups: dict[str, _GroupLog] = {}
        self._saved: dict[str, Callable] = {}
        self._check_group = None
        self.step = 0

    # -- installing -----------------------------------------------------------------------

    def install(self) -> "CollectiveLog":
        if self._saved:
            return self
        for op in WRAPPED:
            original = getattr(dist, op)
            self._saved[op] = original
            setattr(dist, op, self._wrap(op, original))
        return self

    def uninstall(self) -> None:
        for op, original in self._saved.items():
            setattr(dist, op, original)
        self._saved.clear()

    def __enter__(self) -> "CollectiveLog":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def watch(self, group, name: str) -> None:
        """Call ``group`` (a process group this rank is a member of; None: the default group)
        ``name`` in messages, and compare it at every :meth:`check_step` even when unused."""
        if group is not None and group == dist.GroupMember.NON_GROUP_MEMBER:
            return
        with self._lock:
            self._log_of(group, name)

    def _log_of(self, group, name: str | None = None) -> _GroupLog:
        pg = group if group is not None else dist.group.WORLD
        key = pg.group_name
        log = self._groups.get(key)
        if log is None:
            ranks = dist.get_process_group_ranks(pg)
            label = name or ("world" if group is None else "group")
            log = self._groups[key] = _GroupLog(f"{label} (ranks {_ranks_text(ranks)})", ranks)
        elif name and log.name.startswith("group ("):
            log.name = f"{name} (ranks {_ranks_text(log.ranks)})"
        return log

    # -- recording ------------------------------------------------------------------------

    def _wrap(self, op: str, original: Callable) -> Callable:
        @functools.wraps(original)
        def call(*args, **kwargs):
            group = _group_of(op, args, kwargs)
            label = getattr(_label, "value", "")
            signature = _signature(op, args, kwargs)
            with self._lock:
                log = self._log_of(group)
                entry = [op, label, signature]
                log.ops.append(entry)
                log.digest.update(json.dumps(entry).encode())
                what = _describe(entry, log, len(log.ops) - 1, self.step)
            try:
                result = original(*args, **kwargs)
            except RuntimeError as err:
                raise CollectiveFailed(_failure_text(what, err)) from err
            return _NamedWork(result, lambda: what) if result is not None and kwargs.get("async_op") else result

        return call

    # -- comparing ------------------------------------------------------------------------

    def prepare_check(self, timeout_s: float = 120.0) -> None:
        """Create the group the checks talk on (a collective: every rank calls it once, at the
        same point, after the training groups exist)."""
        if self._check_group is None:
            world = list(range(dist.get_world_size()))
            self._check_group = dist.new_group(world, backend="gloo", timeout=timedelta(seconds=timeout_s))

    def check_step(self, step: int) -> None:
        """Compare this step's sequences with every other rank's, then start the next step.

        Raises:
            CollectiveOrderError: on every rank, when members of a group issued different
                sequences; names the group and the first differing collective on each side.
        """
        self.prepare_check()
        with self._lock:
            logs = dict(self._groups)
            table = torch.zeros(MAX_GROUPS, 3, dtype=torch.int64)
            if len(logs) > MAX_GROUPS:
                raise LinaError(
                    f"the collective check follows at most {MAX_GROUPS} process groups per rank, "
                    f"this rank has {len(logs)}"
                )
            for i, (key, log) in enumerate(sorted(logs.items())):
                table[i, 0] = _int64(key)
                table[i, 1] = int.from_bytes(log.digest.digest(), "little", signed=True)
                table[i, 2] = len(log.ops) + 1  # + 1: a used slot is never all zero
        world = dist.get_world_size()
        gathered = [torch.empty_like(table) for _ in range(world)]
        self._saved.get("all_gather", dist.all_gather)(gathered, table, group=self._check_group)
        if _consistent(gathered):
            self._next_step(step)
            return
        sequences = self._gather_sequences(logs)
        self._next_step(step)
        raise CollectiveOrderError(_first_difference(sequences, step))

    def _gather_sequences(self, logs: dict[str, _GroupLog]) -> list[dict]:
        mine = {key: {"name": log.name, "ranks": log.ranks, "ops": log.ops} for key, log in logs.items()}
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, json.dumps(mine), group=self._check_group)
        return [json.loads(text) for text in out]

    def _next_step(self, step: int) -> None:
        with self._lock:
            self.step = step + 1
            for log in self._groups.values():
                log.ops = []
                log.digest = hashlib.blake2b(digest_size=8)


def _int64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _ranks_text(ranks: list[int]) -> str:
    if ranks and ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 2:
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def _describe(entry: list, log: _GroupLog, index: int, step: int) -> str:
    op, label, signature = entry
    name = f" {label!r}" if label else ""
    sig = f" [{signature}]" if signature else ""
    return f"collective #{index} of step {step} on group {log.name}: {op}{name}{sig}"


def _consistent(gathered: list[torch.Tensor]) -> bool:
    """Whether every group key has one (hash, count) across all ranks that report it."""
    seen: dict[int, tuple[int, int]] = {}
    for table in gathered:
        for key, digest, count in table.tolist():
            if count == 0:
                continue
            if seen.setdefault(key, (digest, count)) != (digest, count):
                return False
    return True


def _first_difference(sequences: list[dict], step: int) -> str:
    """The first collective where two members of a group differ, as a message with the fix."""
    for key in sorted({k for seq in sequences for k in seq}):
        holders = [(rank, seq[key]) for rank, seq in enumerate(sequences) if key in seq]
        (r0, first), others = holders[0], holders[1:]
        for r1, other in others:
            a, b = first["ops"], other["ops"]
            if a == b:
                continue
            i = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))

            def show(ops: list, rank: int) -> str:
                if i >= len(ops):
                    return f"nothing (rank {rank} issued only {len(ops)})"
                op, label, sig = ops[i]
                return f"{op}{' ' + repr(label) if label else ''}{' [' + sig + ']' if sig else ''} on rank {rank}"

            return (
                f"ranks issued collectives in different orders in step {step} on group {first['name']}: "
                f"collective #{i} is {show(a, r0)} but {show(b, r1)}. Fix: every rank must issue the "
                "collectives of one process group in the same order (see lina.comm.scheduler); otherwise "
                "Gloo combines the wrong tensors and NCCL hangs"
            )
    return (
        f"the collective sequences of step {step} differ between ranks, but the gathered sequences agree "
        "(a hash collision?)"
    )

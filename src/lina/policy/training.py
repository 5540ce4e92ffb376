"""Training policies as typed specs: one registry, read by the trainer, the benchmarks and the simulator.

A policy is four choices; nothing else anywhere depends on its name:

- ``a2a_split``: ``none`` (one all-to-all per dispatch and combine), ``tutel`` (split into
  ``pipeline_chunks`` pieces overlapped with the expert FFN; the simulator uses
  ``TrainSpec.tutel_chunks``), ``micro`` (Lina's micro-ops, pipelined with the expert FFN);
- ``grad_sync``: ``ddp`` (buckets allreduced as soon as ready, during backward), ``after`` (the
  same buckets once backward is over), ``microops`` (every gradient split into ``chunk_mb``
  pieces, never mixing tensors, sent by the priority scheduler), ``none`` (no gradient traffic,
  timing only: the lower bound);
- ``priority``: an allreduce may start only while no all-to-all runs or waits;
- ``packing``: Lina's expert packing (the controller of ``--packing auto`` decides the layout
  unless the run fixes one).

Adding a policy is one spec here (or a subclass of :class:`TrainPolicy` anywhere) and one
:func:`register_train_policy` call. A policy outside this package is named by its import path,
``module:NAME`` (a registered spec's module attribute), so that every worker process finds it.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from lina.errors import ConfigError

A2A_SPLITS = ("none", "tutel", "micro")
NO_SYNC_SUFFIX = "/no-sync"
GRAD_SYNCS = ("ddp", "after", "microops", "none")


@dataclass(frozen=True)
class TrainPolicy:
    """One training policy.

    Attributes:
        name: the name users pass to ``--policy`` and see in every report.
        a2a_split, grad_sync, priority, packing: the four choices (module docstring).
        description: one line for ``--help`` and reports.
    """

    name: str
    a2a_split: str
    grad_sync: str
    priority: bool
    packing: bool
    description: str

    def __post_init__(self):
        if self.a2a_split not in A2A_SPLITS:
            raise ConfigError("a2a_split", f"unknown {self.a2a_split!r}", f"use one of {', '.join(A2A_SPLITS)}")
        if self.grad_sync not in GRAD_SYNCS:
            raise ConfigError("grad_sync", f"unknown {self.grad_sync!r}", f"use one of {', '.join(GRAD_SYNCS)}")
        if self.grad_sync == "microops" and not self.priority:
            raise ConfigError(
                "priority",
                f"policy {self.name!r} partitions gradients into micro-ops without priority",
                "micro-ops go through the priority scheduler: set priority=True",
            )

    @property
    def pipelined(self) -> bool:
        """All-to-alls split into micro-ops overlapped with the expert FFN."""
        return self.a2a_split != "none"

    @property
    def partitions_gradients(self) -> bool:
        """Gradients go in ``chunk_mb`` micro-ops (so ``--chunk-mb auto`` runs its start-up sweep)."""
        return self.grad_sync == "microops"

    @property
    def trainable(self) -> bool:
        """The real trainer can run it: every combination except whole DDP buckets behind the
        priority scheduler (the simulator's ``lina-priority`` ablation)."""
        return not (self.grad_sync in ("ddp", "after") and self.priority)

    def without_grad_sync(self) -> "TrainPolicy":
        """This policy with its gradient allreduce switched off (``NAME/no-sync``): its measured
        lower bound, the step with its all-to-alls alone on the links. Timing only."""
        if self.grad_sync == "none":
            return self
        return TrainPolicy(
            f"{self.name}{NO_SYNC_SUFFIX}",
            self.a2a_split,
            "none",
            False,
            self.packing,
            f"{self.name} with its gradient allreduce off (timing only: its lower bound)",
        )


TRAIN_POLICIES: dict[str, TrainPolicy] = {}


def register_train_policy(policy: TrainPolicy, replace: bool = False) -> TrainPolicy:
    """Add ``policy`` to the registry under its name and return it (``replace`` allows
    re-registering a name, e.g. when a module is imported twice)."""
    if not isinstance(policy, TrainPolicy):
        raise ConfigError(
            "policy", f"{policy!r} is not a TrainPolicy", "register an instance of lina.policy.TrainPolicy"
        )
    if policy.name in TRAIN_POLICIES and not replace and TRAIN_POLICIES[policy.name] != policy:
        raise ConfigError(
            "policy", f"a different policy is already registered as {policy.name!r}", "choose another name"
        )
    TRAIN_POLICIES[policy.name] = policy
    return policy


for _p in (
    TrainPolicy(
        "ddp-overlap",
        "none",
        "ddp",
        False,
        False,
        "synchronous all-to-all; DDP buckets allreduced during backward (DeepSpeed-MoE's schedule as lina runs it)",
    ),
    TrainPolicy("sequential", "none", "after", False, False, "synchronous all-to-all; every allreduce after backward"),
    TrainPolicy("tutel", "tutel", "ddp", False, False, "all-to-all split to overlap the expert FFN; DDP buckets"),
    TrainPolicy(
        "lina",
        "micro",
        "microops",
        True,
        False,
        "gradient micro-ops behind every all-to-all; all-to-all/FFN pipelining",
    ),
    TrainPolicy(
        "lina+packing", "micro", "microops", True, True, "lina plus expert packing chosen by the packing controller"
    ),
    TrainPolicy("lina-priority", "none", "ddp", True, False, "ablation (simulator): priority only, whole DDP buckets"),
    TrainPolicy(
        "lina-partition", "none", "microops", True, False, "ablation: priority and partitioning, no pipelining"
    ),
    TrainPolicy(
        "lower-bound", "none", "none", False, False, "every all-to-all alone at full speed, no allreduce (timing only)"
    ),
):
    register_train_policy(_p)

#: the policy every training speedup is measured against
BASELINE_POLICY = "ddp-overlap"

#: what ``lina bench train`` and ``lina sim`` compare by default, in this order
BENCH_POLICIES = (BASELINE_POLICY, "sequential", "tutel", "lina", "lina+packing")

#: old policy name -> its name now (still accepted, with a note). ``deepspeed`` was lina's own
#: re-creation of DeepSpeed-MoE's schedule; measured beside the real DeepSpeed engine (``lina bench
#: train --peers``) it is not DeepSpeed, so it is named after what it does.
POLICY_ALIASES = {"deepspeed": BASELINE_POLICY}

_noted: set[str] = set()


def canonical_policy_name(name: str) -> str:
    """``name`` with an old policy name (:data:`POLICY_ALIASES`, also as ``OLD/no-sync``) replaced by
    its name now; the first use of each old name in a process prints a note on stderr."""
    if not isinstance(name, str):
        return name
    base, suffix = (name[: -len(NO_SYNC_SUFFIX)], NO_SYNC_SUFFIX) if name.endswith(NO_SYNC_SUFFIX) else (name, "")
    if base not in POLICY_ALIASES:
        return name
    new = POLICY_ALIASES[base]
    if base not in _noted:
        _noted.add(base)
        print(
            f"lina: note: the training policy {base!r} is now called {new!r} (lina's re-creation of "
            "DeepSpeed-MoE's schedule; the real DeepSpeed runs beside lina with `lina bench train --peers`); "
            f"{base!r} is still accepted",
            file=sys.stderr,
        )
    return new + suffix


def train_policy(name: str | TrainPolicy) -> TrainPolicy:
    """The policy called ``name`` (a registered name, or ``module:ATTR`` naming a registered spec
    in an importable module); a :class:`ConfigError` lists the known ones otherwise."""
    if isinstance(name, TrainPolicy):
        return name
    name = canonical_policy_name(name)
    if name in TRAIN_POLICIES:
        return TRAIN_POLICIES[name]
    if isinstance(name, str) and name.endswith(NO_SYNC_SUFFIX):
        return register_train_policy(train_policy(name[: -len(NO_SYNC_SUFFIX)]).without_grad_sync(), replace=True)
    if isinstance(name, str) and ":" in name:
        return _import_policy(name)
    raise ConfigError(
        "policy",
        f"unknown training policy {name!r}",
        f"use one of {', '.join(TRAIN_POLICIES)}, NAME{NO_SYNC_SUFFIX} for a policy's lower bound, "
        "or module:NAME for a policy of your own",
    )


def _import_policy(path: str) -> TrainPolicy:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            "policy",
            f"cannot import {module_name!r} for policy {path!r} ({err})",
            "put the module on PYTHONPATH or install its package",
        ) from None
    spec = getattr(module, attr, None)
    if not isinstance(spec, TrainPolicy):
        raise ConfigError(
            "policy", f"{path!r} is not a TrainPolicy", f"define {attr} = TrainPolicy(...) in {module_name}"
        )
    register_train_policy(spec, replace=True)
    return spec

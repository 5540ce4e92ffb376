"""lina.policy: the registry of training policies (pure data, imports nothing above ``lina.errors``).

The trainer's gradient sync (:func:`lina.comm.policies.make_sync`), the packing controller
(:attr:`lina.config.TrainConfig.effective_packing`), ``lina bench train`` and the simulator's step
(:mod:`lina.sim.train`) are all built from one :class:`TrainPolicy`. Serving policies live beside
their implementation in :mod:`lina.infer.policies` (``SERVING_POLICIES``).
"""

from lina.policy.training import (
    BASELINE_POLICY,
    BENCH_POLICIES,
    POLICY_ALIASES,
    TRAIN_POLICIES,
    TrainPolicy,
    canonical_policy_name,
    register_train_policy,
    train_policy,
)

__all__ = [
    "BASELINE_POLICY",
    "BENCH_POLICIES",
    "POLICY_ALIASES",
    "TRAIN_POLICIES",
    "TrainPolicy",
    "canonical_policy_name",
    "register_train_policy",
    "train_policy",
]

"""lina.sim: the cluster-scale simulator (what Lina gives on clusters this machine cannot run).

Pieces, each in its own module:

- :mod:`~lina.sim.spec`: typed cluster / model / device / training descriptions (and the CPU
  host model an emulated cluster adds, ``ClusterSpec.host``);
- :mod:`~lina.sim.maxmin`, :mod:`~lina.sim.network`, :mod:`~lina.sim.topology`: a flow-level
  network (weighted max-min fair sharing by progressive filling, recomputed at every flow
  arrival and departure), with a representative-host reduction for symmetric traffic;
- :mod:`~lina.sim.collectives`: ring / hierarchical allreduce, pairwise / hierarchical
  all-to-all, as flows;
- :mod:`~lina.sim.compute`: per-op compute costs, measured or from a device roofline;
- :mod:`~lina.sim.engine`, :mod:`~lina.sim.train_step`, :mod:`~lina.sim.train`: one training
  step as tasks on streams, under the policies of :mod:`~lina.policy`;
- :mod:`~lina.sim.infer`: inference batches replayed under the real placement policies;
- :mod:`~lina.sim.calibration`: fit the simulator to measured runs and predict them (a
  package: reading run folders, observations, the fit, the CPU host model, prediction, report);
- :mod:`~lina.sim.scenarios`, :mod:`~lina.sim.infer_scenarios`: built-in scenarios;
  ``lina sim`` (:mod:`lina.commands.sim`) runs them.
"""

from lina.policy import TRAIN_POLICIES, TrainPolicy
from lina.sim.compute import ComputeProfile
from lina.sim.infer import InferSpec, simulate_inference
from lina.sim.scenario import Scenario, load_toml
from lina.sim.spec import ClusterSpec, CpuHostModel, DeviceSpec, ModelSpec, TrainSpec
from lina.sim.train import TrainResult, simulate_policies, simulate_step

__all__ = [
    "ClusterSpec",
    "CpuHostModel",
    "ModelSpec",
    "DeviceSpec",
    "TrainSpec",
    "ComputeProfile",
    "TrainPolicy",
    "TRAIN_POLICIES",
    "Scenario",
    "load_toml",
    "TrainResult",
    "simulate_step",
    "simulate_policies",
    "InferSpec",
    "simulate_inference",
]

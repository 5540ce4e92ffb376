"""Run scenarios, suites and sweeps; the results the command prints, saves and plots."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from lina.policy import BASELINE_POLICY
from lina.sim.scenario import Scenario
from lina.sim.train import TrainResult, simulate_policies, simulate_step

Progress = Callable[[str], None]


def _quiet(line: str) -> None:
    return None


@dataclass
class ScenarioRun:
    """Every policy's simulated step on one scenario, plus the lower bound."""

    scenario: Scenario
    results: dict[str, TrainResult]
    lower_bound: TrainResult

    @property
    def baseline(self) -> TrainResult | None:
        return self.results.get(BASELINE_POLICY)

    def to_dict(self) -> dict:
        sc = self.scenario
        return {
            "scenario": sc.name,
            "description": sc.description,
            "gpus": sc.gpus,
            "cluster": asdict(sc.cluster),
            "model": {**asdict(sc.model), "total_params": sc.model.total_params, "tokens_per_gpu": sc.model.tokens},
            "train": asdict(sc.train),
            "compute_profile": sc.compute_profile().to_dict(),
            "device": asdict(sc.device) if sc.device is not None else None,
            "lower_bound_step_s": self.lower_bound.step_s,
            "policies": {name: r.to_dict() for name, r in self.results.items()},
        }


def run_scenario(scenario: Scenario, progress: Progress = _quiet) -> ScenarioRun:
    """Simulate one step of every policy of ``scenario`` (a line of progress per policy)."""
    memory = scenario.device.mem_gb if scenario.device is not None else None
    profile = scenario.compute_profile()

    def report(r: TrainResult) -> None:
        progress(
            f"  {scenario.name}: {r.policy:<14} step {r.step_s * 1e3:9.1f} ms  "
            f"(simulated in {r.sim_wall_s:.2f} s, {r.events} events)"
        )

    results = simulate_policies(
        scenario.cluster, scenario.model, profile, scenario.train, scenario.policies, memory_gb=memory, progress=report
    )
    lower = simulate_step(scenario.cluster, scenario.model, profile, scenario.train, "lower-bound", memory_gb=memory)
    return ScenarioRun(scenario, results, lower)


def sweep(scenario: Scenario, axis: str, values: list[float], progress: Progress = _quiet) -> list[ScenarioRun]:
    """Run ``scenario`` at every value of ``axis``: ``gpus`` (hosts = value / gpus_per_host) or ``link`` (Gb/s)."""
    runs = []
    for i, value in enumerate(values, 1):
        if axis == "gpus":
            variant = scenario.with_hosts(int(value) // scenario.cluster.gpus_per_host)
        else:
            variant = scenario.with_link(float(value))
        progress(f"[{i}/{len(values)}] {variant.name}")
        runs.append(run_scenario(variant, progress))
    return runs


def default_sweep_values(scenario: Scenario, axis: str) -> list[float]:
    """GPU counts from one host up to 1024 GPUs (powers of two), or link rates 25-800 Gb/s."""
    if axis == "link":
        return [25.0, 50.0, 100.0, 200.0, 400.0, 800.0]
    g = scenario.cluster.gpus_per_host
    out = []
    hosts = 2 if g == 1 else 1
    while hosts * g <= 1024:
        out.append(float(hosts * g))
        hosts *= 2
    return out

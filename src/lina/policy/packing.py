"""What a run asks of expert packing: the ``--packing`` grammar and the layouts it may use.

``off`` | ``auto`` | ``N`` | ``N@S`` (see :mod:`lina.train.packing` for the controller that acts on
it). Pure data and arithmetic: the config validates with it, the trainer, benchmarks and simulator
read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lina.errors import ConfigError

REVERT_MARGIN = 0.05  # a doubling that makes the mean step slower than this is undone


@dataclass(frozen=True)
class PackingSpec:
    mode: str  # "off" | "auto" | "fixed"
    experts_per_rank: int = 0  # fixed only
    at_step: int = 0  # fixed only: the first step run with that packing


def parse_packing(text: str) -> PackingSpec:
    """``off`` | ``auto`` | ``N`` | ``N@S`` -> :class:`PackingSpec` (ConfigError otherwise)."""
    value = str(text).strip().lower()
    if value in ("off", "auto"):
        return PackingSpec(value)
    n_text, _, s_text = value.partition("@")
    fix = "use --packing off, auto, N (experts per rank, e.g. 2) or N@STEP (e.g. 2@10)"
    try:
        n, at = int(n_text), int(s_text) if s_text else 0
    except ValueError:
        raise ConfigError("packing", f"{text!r} is not off, auto, N or N@STEP", fix) from None
    if n < 1 or at < 0:
        raise ConfigError("packing", f"{text!r}: N must be >= 1 and STEP >= 0", fix)
    return PackingSpec("fixed", n, at)


def valid_experts_per_rank(experts: int, workers: int) -> list[int]:
    """Experts per rank of every layout of ``experts`` experts on ``workers`` ranks, ascending."""
    return [experts // ep for ep in range(workers, 0, -1) if workers % ep == 0 and experts % ep == 0]


def packing_ep_sizes(spec: PackingSpec, experts: int, base_ep: int) -> list[int]:
    """Every EP size a run may use (their process groups are created at start-up).
    ``auto`` halves the base size while it is even; ``N@S`` uses the base size, then E / N."""
    if spec.mode == "off":
        return [base_ep]
    if spec.mode == "fixed":
        target = experts // spec.experts_per_rank
        return [target] if spec.at_step == 0 else sorted({base_ep, target}, reverse=True)
    sizes = [base_ep]
    while sizes[-1] % 2 == 0:
        sizes.append(sizes[-1] // 2)
    return sizes

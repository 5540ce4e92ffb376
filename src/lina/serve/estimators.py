"""The popularity estimator a served placement uses: loaded from ``--estimator FILE`` (fitted by
``lina analyze trace --save-estimator`` on a large recorded trace) or fitted on the prompts' own
routing, and with ``--online-decay`` turned into one that keeps learning while it serves."""

from __future__ import annotations

from pathlib import Path

import torch

from lina.errors import ConfigError, LinaError
from lina.placement.estimators import (
    DecodeAwareEstimator,
    OnlinePathEstimator,
    PathEstimator,
    PopularityEstimator,
    load_estimator,
)

#: placement -> the estimator kinds it can use (the first is what it fits on the prompts)
ESTIMATOR_PLACEMENTS: dict[str, tuple[str, ...]] = {
    "lina": ("path", "decode", "online-path", "logistic"),
    "lina-window-predict": ("decode",),
    "lina-auto": ("path", "decode", "online-path", "logistic"),
}
FIT_HINT = "fit one with `lina analyze trace TRACE --save-estimator OUT.npz --estimator {kind}`"


def check_estimator_file(path: str | Path, placement: str, experts: int, layers: int, online: bool) -> None:
    """Refuse (ConfigError, before any worker starts) an estimator file that is missing, is not an
    estimator, does not match the model's ``experts`` x ``layers`` MoE layers, does not suit
    ``placement``, or cannot learn online when ``online``."""
    kinds = ESTIMATOR_PLACEMENTS.get(placement)
    if kinds is None:
        raise ConfigError(
            "estimator",
            f"placement {placement} uses no estimator",
            f"drop --estimator, or use --placement {' or '.join(ESTIMATOR_PLACEMENTS)}",
        )
    hint = FIT_HINT.format(kind=kinds[0])
    if not Path(path).is_file():
        raise ConfigError("estimator", f"{path} not found", hint)
    try:
        est = load_estimator(path)
    except LinaError as err:
        raise ConfigError("estimator", f"{path} is not a lina estimator ({err})", hint) from None
    if (est.num_experts, est.num_layers) != (experts, layers):
        raise ConfigError(
            "estimator",
            f"{path} was fitted for {est.num_experts} experts x {est.num_layers} MoE layers, the model has "
            f"{experts} x {layers}",
            f"{hint} on a trace of this model (lina infer --record-trace)",
        )
    if est.kind not in kinds:
        raise ConfigError("estimator", f"{path} holds a {est.kind} estimator; {placement} needs {kinds[0]}", hint)
    if online and online_base(est) is None:
        raise ConfigError(
            "online-decay",
            f"{path} holds a {est.kind} estimator, which cannot learn online",
            f"drop --online-decay, or {FIT_HINT.format(kind='path')}",
        )


def online_base(est: PopularityEstimator) -> PathEstimator | None:
    """The path table online learning updates: the estimator's own, or a decode-aware one's path."""
    if isinstance(est, DecodeAwareEstimator):
        return est.path
    return est if isinstance(est, PathEstimator) else None


def fit_on_prompts(model, prompts: list[torch.Tensor], placement: str, path_len: int = 3) -> PopularityEstimator:
    """The estimator ``placement`` uses, fitted on the prompts' own routing (every rank sees every
    prompt, so every rank fits the same one). ``prompts``: LongTensor[1, S] per request."""
    from lina.infer.model_adapter import record_routing

    trace = record_routing(model, prompts, "prompts")
    path = PathEstimator(max(1, min(path_len, len(model.moe_layers()) - 1))).fit(trace)
    return DecodeAwareEstimator(path).fit(trace) if ESTIMATOR_PLACEMENTS[placement][0] == "decode" else path


def serving_estimator(
    placement: str, model, prompts: list[torch.Tensor], file: str | None, online_decay: float | None
) -> PopularityEstimator | None:
    """The estimator ``placement`` plans with (None where it uses none): ``file``'s or fitted on the
    prompts; with ``online_decay`` its path table is an :class:`OnlinePathEstimator` from then on."""
    if placement not in ESTIMATOR_PLACEMENTS:
        return None
    est = load_estimator(file) if file else fit_on_prompts(model, prompts, placement)
    if online_decay is None:
        return est
    base = online_base(est)
    online = OnlinePathEstimator.from_offline(base, online_decay)
    if isinstance(est, DecodeAwareEstimator):
        est.path = online
        return est
    return online

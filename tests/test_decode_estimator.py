"""The decode-aware estimator: where a sequence's next token routes like its previous one at the
same layer it beats the path-only estimator on decode tokens; where it does not, it learns to
ignore the previous token and is no worse."""

import numpy as np
import torch

from lina.data.routing_trace import RoutingTrace
from lina.placement.estimators import PathEstimator
from lina.placement.estimators.decode import DecodeAwareEstimator, previous_rows
from lina.placement.metrics import token_topk_recall

E, L, K, SEQ = 8, 3, 2, 32


def sticky_trace(seed: int, stick: float, sequences: int = 48) -> RoutingTrace:
    """Per layer, each token keeps its predecessor's experts with probability ``stick``, else
    draws two at random (the path through earlier layers tells nothing)."""
    g = np.random.default_rng(seed)
    experts = np.zeros((sequences * SEQ, L, K), dtype=np.int64)
    for s in range(sequences):
        for t in range(SEQ):
            row = s * SEQ + t
            for j in range(L):
                if t > 0 and g.random() < stick:
                    experts[row, j] = experts[row - 1, j]
                else:
                    experts[row, j] = g.choice(E, size=K, replace=False)
    return RoutingTrace(
        experts=experts.astype(np.int16),
        seq_id=np.repeat(np.arange(sequences), SEQ).astype(np.int32),
        token_idx=np.tile(np.arange(SEQ), sequences).astype(np.int32),
        num_experts=E,
        top_k=K,
    )


def _recalls(trace: RoutingTrace, path: PathEstimator, aware: DecodeAwareEstimator) -> tuple[float, float]:
    ex = trace.expert_tensor()
    prev = torch.from_numpy(previous_rows(trace))
    keep = prev >= 0
    cur, before = ex[keep], ex[prev[keep]]
    p = [float(token_topk_recall(path.predict(j, cur[:, :j, 0]), cur[:, j]).mean()) for j in range(1, L)]
    a = [
        float(token_topk_recall(aware.predict(j, cur[:, :j, 0], before[:, j, 0]), cur[:, j]).mean())
        for j in range(1, L)
    ]
    return float(np.mean(p)), float(np.mean(a))


def test_previous_rows_link_each_token_to_its_predecessor():
    trace = sticky_trace(0, 0.5, sequences=2)
    prev = previous_rows(trace)
    assert prev[0] == -1 and prev[SEQ] == -1 and prev[1] == 0 and prev[SEQ + 5] == SEQ + 4


def test_decode_aware_beats_path_only_where_tokens_stick():
    fit, held = sticky_trace(1, 0.8), sticky_trace(2, 0.8)
    path = PathEstimator(2).fit(fit)
    aware = DecodeAwareEstimator(path).fit(fit)
    assert (aware.alpha[1:] >= 0.5).all()
    path_recall, aware_recall = _recalls(held, path, aware)
    assert aware_recall > path_recall + 0.2


def test_decode_aware_ignores_a_previous_token_that_tells_nothing():
    fit, held = sticky_trace(3, 0.0), sticky_trace(4, 0.0)
    path = PathEstimator(2).fit(fit)
    aware = DecodeAwareEstimator(path).fit(fit)
    path_recall, aware_recall = _recalls(held, path, aware)
    assert aware_recall >= path_recall - 0.03

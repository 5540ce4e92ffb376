"""A learned estimator (beyond the paper): multinomial logistic regression per layer.

For the layer ``j`` about to be gated, the features are one-hot codes of the experts the
token chose at layers ``j-l .. j-1``. With ``use_topk`` (k > 1), each past layer gives
``(1 + k) * E`` inputs: "chose expert e" whatever the rank (shared strength, what sparse
traces need) and "chose e as its r-th choice" (what big traces can afford); without it,
the top-1 expert only (``E`` inputs per layer). The model is
``softmax(b_j + sum of W_j rows of the set features)`` over layer ``j``'s experts, fitted
with L2 weight decay against the soft target "each of the k chosen experts has 1/k".

Unlike the path table it shares strength between paths (a path never seen still gets
the evidence of each of its layers), and it can use the second choices of a top-2 model,
which the path key ignores. Fitting is full-batch (or minibatch for big traces) Adam on
CPU; a few seconds for ~10^4 tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from lina.data.routing_trace import RoutingTrace
from lina.errors import ConfigError
from lina.placement.estimators.base import PopularityEstimator, as_history

WEIGHT_DECAY_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


class LogisticEstimator(PopularityEstimator):
    """Per-layer multinomial logistic regression on the last ``path_len`` layers' experts.

    Args:
        path_len: ``l``, layers of history used.
        use_topk: use all k experts chosen per past layer (else the top-1 only).
        weight_decay: L2 penalty on the weights (per layer, added to the mean loss), or
            ``"auto"``: chosen from ``WEIGHT_DECAY_GRID`` on a held-in split (see :meth:`fit`).
        steps: optimizer steps.
        lr: Adam learning rate.
        batch_tokens: tokens per minibatch (whole trace when it is smaller).
        seed: for the minibatch order.
    """

    kind = "logistic"

    def __init__(
        self,
        path_len: int = 3,
        use_topk: bool = True,
        weight_decay: float | str = "auto",
        steps: int = 150,
        lr: float = 0.1,
        batch_tokens: int = 4096,
        seed: int = 0,
    ):
        if path_len < 0:
            raise ConfigError("path_len", f"is {path_len}", "give 0 (marginal only) or more layers")
        if weight_decay != "auto" and not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise ConfigError("weight_decay", f"is {weight_decay!r}", "give a penalty >= 0 or 'auto'")
        if steps < 1 or batch_tokens < 1 or lr <= 0:
            raise ConfigError("steps/batch_tokens/lr", f"are {steps}/{batch_tokens}/{lr}", "give positive values")
        self.path_len = path_len
        self.use_topk = bool(use_topk)
        self.weight_decay = weight_decay if weight_decay == "auto" else float(weight_decay)
        self.chosen_weight_decay = float("nan")
        self.selection_scores: dict[float, float] = {}
        self.steps = steps
        self.lr = float(lr)
        self.batch_tokens = batch_tokens
        self.seed = seed
        self.weight: torch.Tensor | None = None  # [L, F, E]
        self.bias: torch.Tensor | None = None  # [L, E]
        self.final_loss = float("nan")

    @property
    def _per_layer(self) -> int:
        return self.top_k if self.use_topk else 1

    @property
    def _groups(self) -> int:
        """Feature blocks per past layer: 1 (top-1 only) or 1 + k (any rank, then per rank) in E-wide blocks."""
        return 1 if self._per_layer == 1 else 1 + self._per_layer

    @property
    def _num_features(self) -> int:
        """``F = max(l, 1) * groups * E``."""
        return max(self.path_len, 1) * self._groups * self.num_experts

    def _features(self, history: torch.Tensor, layer: int) -> torch.Tensor:
        """Feature indices ``LongTensor[T, n]`` for ``layer`` from ``history [T, h, k]``; padding index = F."""
        tokens, depth, k_hist = history.shape
        kf = self._per_layer
        if k_hist < kf:
            raise ConfigError(
                "history", f"has {k_hist} experts per layer", f"this estimator uses {kf}; pass [T, h, {kf}]"
            )
        e = self.num_experts
        groups = self._groups
        idx = torch.full(
            (tokens, max(self.path_len, 1), groups, kf), self._num_features, dtype=torch.long
        )  # l = 0: padding
        rank_offset = torch.arange(kf) * e
        for i in range(1, min(self.path_len, layer, depth) + 1):  # i = 1 is layer - 1
            chosen = history[:, depth - i, :kf]
            base = (i - 1) * groups * e
            idx[:, i - 1, 0] = base + chosen  # "chose e at this layer", whatever the rank
            if groups > 1:
                idx[:, i - 1, 1] = base + e + rank_offset + chosen  # "chose e as its r-th choice"
        return idx.reshape(tokens, -1)

    def _dense(self, idx: torch.Tensor) -> torch.Tensor:
        """Feature indices ``[..., n]`` -> multi-hot ``FloatTensor[..., F]`` (padding dropped)."""
        num_features = self._num_features
        dense = torch.zeros(*idx.shape[:-1], num_features + 1)
        dense.scatter_(-1, idx, 1.0)
        return dense[..., :num_features]

    def fit(self, trace: RoutingTrace) -> LogisticEstimator:
        """Fit all layers' weights on the trace (each token contributes one example per layer).

        With ``weight_decay="auto"`` the penalty is chosen first: each value of
        ``WEIGHT_DECAY_GRID`` is fitted on the first 80% of every sequence of ``trace`` and
        scored (cross-entropy) on the rest; the best one is then fitted on all of it and
        kept in ``chosen_weight_decay``.
        """
        if self.weight_decay == "auto":
            self.chosen_weight_decay = self._select_weight_decay(trace)
        else:
            self.chosen_weight_decay = float(self.weight_decay)
        small = trace.num_tokens * trace.num_layers * max(self.path_len, 1) * trace.num_experts < 10_000_000
        threads = torch.get_num_threads()
        if small:  # tiny matrices: thread hand-offs cost more than they save
            torch.set_num_threads(1)
        try:
            return self._fit(trace, self.chosen_weight_decay)
        finally:
            torch.set_num_threads(threads)

    def _select_weight_decay(self, trace: RoutingTrace) -> float:
        inner_fit, inner_val = trace.split(0.8, by="position")
        if inner_val.num_tokens == 0 or inner_fit.num_tokens == 0:
            return WEIGHT_DECAY_GRID[len(WEIGHT_DECAY_GRID) // 2]
        scores = {}
        for wd in WEIGHT_DECAY_GRID:
            probe = LogisticEstimator(
                self.path_len, self.use_topk, wd, self.steps, self.lr, self.batch_tokens, self.seed
            )
            probe.fit(inner_fit)
            scores[wd] = probe.cross_entropy(inner_val)
        self.selection_scores = scores
        return min(scores, key=scores.get)

    def cross_entropy(self, trace: RoutingTrace) -> float:
        """Mean over tokens and layers of ``-sum_e target_e log p_e`` (target: 1/k on each chosen expert)."""
        experts = trace.expert_tensor()
        total = 0.0
        for layer in range(self.num_layers):
            probs = self.predict(layer, experts[:, :layer]).clamp_min(1e-12)
            total += float(-(probs.log().gather(1, experts[:, layer]).mean(dim=1)).mean())
        return total / self.num_layers

    def _fit(self, trace: RoutingTrace, weight_decay: float) -> LogisticEstimator:
        """Adam written out here (a dozen lines) rather than ``torch.optim``, whose first use
        imports the compiler stack and costs seconds."""
        self.num_experts, self.num_layers, self.top_k = trace.num_experts, trace.num_layers, trace.top_k
        experts = trace.expert_tensor()
        tokens = experts.shape[0]
        # [L, T, n] feature indices and [L, T, E] soft targets.
        feats = torch.stack([self._features(experts[:, :layer], layer) for layer in range(self.num_layers)], dim=0)
        target = torch.zeros(tokens, self.num_layers, self.num_experts)
        target.scatter_(2, experts, 1.0 / self.top_k)
        target = target.transpose(0, 1).contiguous()
        num_features = self._num_features
        weight = torch.zeros(self.num_layers, num_features, self.num_experts, requires_grad=True)
        bias = torch.zeros(self.num_layers, 1, self.num_experts, requires_grad=True)
        params = [weight, bias]
        moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        gen = torch.Generator().manual_seed(self.seed)
        full_batch = tokens <= self.batch_tokens
        x_all = self._dense(feats) if full_batch else None
        for step in range(1, self.steps + 1):
            if full_batch:
                x, y = x_all, target
            else:
                pick = torch.randint(0, tokens, (self.batch_tokens,), generator=gen)
                x, y = self._dense(feats[:, pick]), target[:, pick]
            logits = torch.bmm(x, weight) + bias  # [L, B, E]
            ce = -(y * torch.log_softmax(logits, dim=2)).sum(dim=2).mean(dim=1).sum()
            loss = ce + weight_decay * weight.pow(2).sum()
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g, (m, v) in zip(params, grads, moments):
                    m.mul_(beta1).add_(g, alpha=1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (v / (1 - beta2**step)).sqrt_().add_(eps)
                    p.addcdiv_(m, denom, value=-self.lr / (1 - beta1**step))
        self.final_loss = float(ce.detach()) / self.num_layers
        self.weight = weight.detach()
        self.bias = bias.detach().squeeze(1)
        return self

    def predict(self, layer: int, history: torch.Tensor) -> torch.Tensor:
        """``FloatTensor[T, E]``: softmax of the layer's logistic model on the token's history."""
        self._check_layer(layer)
        hist = as_history(history, self.num_experts)
        x = self._dense(self._features(hist, layer))
        with torch.no_grad():
            return torch.softmax(x @ self.weight[layer] + self.bias[layer], dim=1)

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta = {
            "path_len": self.path_len,
            "use_topk": self.use_topk,
            "weight_decay": self.weight_decay,
            "chosen_weight_decay": self.chosen_weight_decay,
            "steps": self.steps,
            "lr": self.lr,
            "batch_tokens": self.batch_tokens,
            "seed": self.seed,
            "num_experts": self.num_experts,
            "num_layers": self.num_layers,
            "top_k": self.top_k,
        }
        return meta, {"weight": self.weight.numpy(), "bias": self.bias.numpy()}

    @classmethod
    def _from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> LogisticEstimator:
        est = cls(
            path_len=int(meta["path_len"]),
            use_topk=bool(meta["use_topk"]),
            weight_decay=meta["weight_decay"] if meta["weight_decay"] == "auto" else float(meta["weight_decay"]),
            steps=int(meta["steps"]),
            lr=float(meta["lr"]),
            batch_tokens=int(meta["batch_tokens"]),
            seed=int(meta["seed"]),
        )
        est.num_experts, est.num_layers, est.top_k = (
            int(meta["num_experts"]),
            int(meta["num_layers"]),
            int(meta["top_k"]),
        )
        est.chosen_weight_decay = float(meta.get("chosen_weight_decay", float("nan")))
        est.weight = torch.from_numpy(arrays["weight"]).float()
        est.bias = torch.from_numpy(arrays["bias"]).float()
        return est

"""Real DeepSpeed-MoE as a peer of lina's policies: the project's GPT with ``deepspeed.moe.layer.MoE``
in place of lina's MoE layer, trained by DeepSpeed's engine.

Fair-start rules (what makes its rows comparable with lina's):

- Same model: :class:`lina.models.gpt.MoEGPT` built with the run's seed; every MoE FFN is replaced
  by DeepSpeed's ``MoE`` whose experts are lina's :class:`lina.models.gpt.DenseFFN` (``d_model -> d_ff -> d_model``,
  GELU, biases), lina's expert shape. DeepSpeed deep-copies one expert module into every local
  slot, so each expert is then re-initialised from lina's weights of its *global* expert id (EP
  groups are blocks of consecutive ranks in both, so rank r holds the same ids in both); the gate
  and every non-expert weight are copied too. The peer starts from exactly lina's initial model.
- Same routing: top-k of the softmax, the k weights renormalised; no gate noise
  (``noisy_gate_policy=None``), no sampled second expert (``top2_2nd_expert_sampling=False``), no
  random token selection (``use_rts=False``); dropless (``drop_tokens=False``: capacity = the
  largest expert load in the EP group) or lina's capacity ``ceil(cf * T * k / E)``, at least 1.
  Differences that remain, by design of DeepSpeed: the all-to-all carries E x capacity rows
  (padded) where lina sends exactly the routed rows, and its balance loss counts first choices only.
- Same data, seed, tokens per rank and optimizer: :func:`lina.data.corpus.sample_sequences` with the
  peer's own step counter (its step k sees lina's batch k), torch AdamW (lina's lr and weight
  decay) over ``split_params_into_different_moe_groups_for_optimizer``, fp32.

Device time (``cfg.emulation.compute`` names a device, :mod:`lina.devicetime`): the peer's every compute op
takes that device's time x the dilation, under the same dispatch mode as lina's trainer, and its
gates route by the run's routing trace (:class:`lina.bench.peers.trace_gate.TraceGate`, each rank
from the same place in the trace as lina's), so that beside lina's policies only the communication
schedules differ. No loss is reported then (nothing is computed).

Engines (:data:`PEERS`): ``deepspeed-zero0`` (ZeRO stage 0) and ``deepspeed-zero2`` (stage 2,
``overlap_comm``, contiguous gradients, reduce-scatter). Every collective DeepSpeed issues is
recorded in a lina timeline (:mod:`lina.bench.peers.comm_spans`); the step loop adds ``forward``,
``backward`` (autograd, up to DeepSpeed's post-backward reduction), ``gradsync.finish`` (that
reduction: ``engine.allreduce_gradients``), ``optimizer.step`` and ``step`` spans, so
:func:`lina.obs.report.step_breakdown` measures a peer step as it measures a lina step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lina.bench.peers.comm_spans import Phase, record_collectives
from lina.bench.peers.trace_gate import TraceGate
from lina.config import TrainConfig
from lina.data.corpus import Corpus, sample_sequences
from lina.devices import device_from
from lina.devicetime import DeviceTimeMode, TraceRouting
from lina.errors import LinaError
from lina.models.gpt import DenseFFN, MoEGPT
from lina.moe.experts import local_expert_ids
from lina.moe.layer import MoELayer
from lina.obs.timeline import Span, Timeline


@dataclass(frozen=True)
class PeerSettings:
    """One DeepSpeed engine configuration."""

    zero_stage: int
    overlap_comm: bool = False


PEERS = {
    "deepspeed-zero0": PeerSettings(zero_stage=0),
    "deepspeed-zero2": PeerSettings(zero_stage=2, overlap_comm=True),
}


def import_deepspeed():
    """Import ``deepspeed`` on the CPU accelerator when no GPU is present (the package picks its
    accelerator from ``DS_ACCELERATOR`` at import; without a GPU its auto-detection warns and
    falls back to the CPU anyway). Raises LinaError naming the extra when it is not installed."""
    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        import deepspeed
    except ImportError as err:
        raise LinaError(
            f"the DeepSpeed peer needs the deepspeed package ({err}). "
            "Fix: pip install 'lina[peers]', or leave the peers out (--peers none)"
        ) from None
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # ZeRO-2 gathers updated partitions with a torch call that torch 2.13 marks deprecated
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    return deepspeed


class DeepSpeedMoEFFN(nn.Module):
    """DeepSpeed's ``MoE`` in the place of a :class:`lina.moe.layer.MoELayer` inside a GPT block:
    ``x [B, S, d_model] -> [B, S, d_model]``; the gate's auxiliary loss of the last call is in
    ``self.aux_loss``."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe = moe
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, aux, _counts = self.moe(x)
        self.aux_loss = aux
        return out


class PeerGPT(nn.Module):
    """The GPT with DeepSpeed MoE layers. ``forward(idx [B, S], targets [B, S]) -> (total loss,
    language-model loss)``, total = LM + ``balance_loss_weight`` x the sum of the gates' losses."""

    def __init__(self, gpt: MoEGPT, moe_ffns: list[DeepSpeedMoEFFN], balance_loss_weight: float):
        super().__init__()
        self.gpt = gpt
        self.moe_ffns = moe_ffns  # also reachable through gpt.blocks; a plain list, not registered twice
        self.balance_loss_weight = balance_loss_weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gpt(idx)
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        aux = torch.stack([f.aux_loss for f in self.moe_ffns]).sum() if self.moe_ffns else lm.new_zeros(())
        return lm + self.balance_loss_weight * aux, lm


def build_model(deepspeed, cfg: TrainConfig, rank: int, ep_size: int) -> PeerGPT:
    """lina's initial GPT (``cfg.seed``) with every MoE layer replaced by DeepSpeed's, carrying the
    same gate and the same expert weights for the global ids rank ``rank`` holds at ``ep_size``."""
    m = cfg.model
    torch.manual_seed(cfg.seed)
    gpt = MoEGPT(m, None)  # every expert in one process: the reference weights of every global id
    ffns = []
    for block in gpt.blocks:
        if not isinstance(block.ffn, MoELayer):
            continue
        lina_layer = block.ffn
        moe = deepspeed.moe.layer.MoE(
            hidden_size=m.d_model, expert=DenseFFN(m.d_model, m.d_ff), num_experts=m.experts, ep_size=ep_size,
            k=m.top_k,
            capacity_factor=m.capacity_factor if not m.dropless else 1.0,
            eval_capacity_factor=m.capacity_factor if not m.dropless else 1.0,
            min_capacity=1, noisy_gate_policy=None, drop_tokens=not m.dropless, use_rts=False,
            top2_2nd_expert_sampling=False,
        )  # fmt: skip
        copy_lina_weights(lina_layer, moe, local_expert_ids(rank, ep_size, m.experts))
        ffn = DeepSpeedMoEFFN(moe)
        block.ffn = ffn
        ffns.append(ffn)
    return PeerGPT(gpt, ffns, m.balance_loss_weight)


@torch.no_grad()
def copy_lina_weights(lina_layer: MoELayer, moe: nn.Module, global_ids: list[int]) -> None:
    """Gate and experts of a DeepSpeed ``MoE`` from a lina layer holding every expert:
    local slot i gets global expert ``global_ids[i]`` (``w1 [d, d_ff]`` is ``fc1.weight.T``)."""
    moe.deepspeed_moe.gate.wg.weight.copy_(lina_layer.router.gate.weight)
    src = lina_layer.experts
    for slot, e in zip(moe.deepspeed_moe.experts.deepspeed_experts, global_ids, strict=True):
        slot.fc1.weight.copy_(src.w1[e].t())
        slot.fc1.bias.copy_(src.b1[e])
        slot.fc2.weight.copy_(src.w2[e].t())
        slot.fc2.bias.copy_(src.b2[e])


def engine_config(settings: PeerSettings, batch_size: int, world: int, bucket_elements: int | None) -> dict:
    """DeepSpeed's config for one peer: fp32, no gradient accumulation, ZeRO stage as given.
    ``bucket_elements``: ZeRO-2's reduce / all-gather bucket size (None: DeepSpeed's default)."""
    zero: dict = {"stage": settings.zero_stage}
    if settings.zero_stage >= 1:
        zero |= {"overlap_comm": settings.overlap_comm, "contiguous_gradients": True, "reduce_scatter": True}
        if bucket_elements:
            zero |= {"reduce_bucket_size": int(bucket_elements), "allgather_bucket_size": int(bucket_elements)}
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": batch_size * world,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedPeer:
    """One DeepSpeed engine on this rank, stepping on demand (the benchmark interleaves it with
    lina's policies). Requires the default process group to be up (Gloo on CPU)."""

    def __init__(
        self,
        name: str,
        cfg: TrainConfig,
        corpus: Corpus,
        timeline: Timeline | None = None,
        ep_size: int | None = None,
        bucket_elements: int | None = None,
    ):
        if name not in PEERS:
            raise LinaError(f"unknown peer {name!r}. Fix: use one of {', '.join(PEERS)}")
        deepspeed = import_deepspeed()
        self.name = name
        self.settings = PEERS[name]
        self.cfg = cfg
        self.corpus = corpus
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.ep_size = ep_size or self.world
        self.timeline = timeline or Timeline(self.rank)
        self.phase = Phase()
        # DeepSpeed's engine insists on LOCAL_RANK (torchrun sets it); a process group started
        # another way (one machine, e.g. the tests' spawned ranks) gets its global rank there.
        os.environ.setdefault("LOCAL_RANK", str(self.rank))
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        self._backend = deepspeed.comm.comm.cdb
        record_collectives(self._backend, self.timeline, self.phase, _group_size)
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        model = build_model(deepspeed, cfg, self.rank, self.ep_size)
        self.device_mode = self._device_time(model)
        groups = split_params_into_different_moe_groups_for_optimizer(
            {"params": list(model.parameters()), "name": "parameters"}
        )
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        config = engine_config(self.settings, cfg.batch_size, self.world, bucket_elements)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self._sync_window: list[float] = []
        inner = self.engine.allreduce_gradients

        def allreduce_gradients(*args, **kwargs):
            self._sync_window.append(self.timeline.now())
            try:
                return inner(*args, **kwargs)
            finally:
                self._sync_window.append(self.timeline.now())

        self.engine.allreduce_gradients = allreduce_gradients  # times DeepSpeed's post-backward reduction
        for i, ffn in enumerate(model.moe_ffns):
            _record_expert_compute(ffn.moe.deepspeed_moe.experts, self.timeline, f"moe{i}.experts")
        self.steps_done = 0
        self.losses: list[float] = []  # LM loss of this rank, by the peer's step index

    def _device_time(self, model: PeerGPT) -> DeviceTimeMode | None:
        """In a device-time run: every gate routes by the trace (offset as lina's trainer offsets
        this rank), and the mode every step runs under."""
        cfg = self.cfg
        if not cfg.emulation.device_time:
            return None
        source = TraceRouting.from_file(
            cfg.emulation.routing_trace, cfg.model.experts, offset=self.rank * cfg.batch_size * cfg.model.seq_len
        )
        for j, ffn in enumerate(model.moe_ffns):
            layer = ffn.moe.deepspeed_moe
            layer.gate = TraceGate(layer.gate, source, j)
        return DeviceTimeMode(device_from(cfg.emulation.compute), cfg.emulation.dilation)

    def _sync_device(self) -> None:
        if self.device_mode is not None:
            self.device_mode.sync()

    def train_step(self) -> Span:
        """One training step (batch ``steps_done``, as lina's step of that index); returns its span."""
        cfg, tl = self.cfg, self.timeline
        step = self.steps_done
        x, y = sample_sequences(  # this rank's share of the step's global batch, as lina's trainer takes it
            self.corpus.train, cfg.model.seq_len, cfg.seed, step, self.rank * cfg.batch_size, cfg.batch_size
        )
        self.engine.train()
        record_collectives(self._backend, tl, self.phase, _group_size)  # this peer's turn on the shared backend
        self._sync_window = []
        start = tl.now()
        with self.device_mode if self.device_mode is not None else contextlib.nullcontext():
            self.phase.name = "fwd"
            with tl.span("forward", "compute", step=step):
                loss, lm = self.engine(x, y)
                self._sync_device()
            self.phase.name = "bwd"
            bwd_start = tl.now()
            self.engine.backward(loss)
            self._sync_device()
            bwd_end = tl.now()
            window = self._sync_window or [bwd_end]
            sync_start, sync_end = window[0], window[-1]
            tl.record("backward", "compute", bwd_start, sync_start, step=step)
            tl.record("gradsync.finish", "sched", sync_start, max(sync_end, bwd_end), step=step)
            self.phase.name = "step"
            with tl.span("optimizer.step", "compute", step=step):
                self.engine.step()
                self._sync_device()
        end = tl.now()
        tl.record("step", "step", start, end, step=step, policy=self.name)
        # nothing is computed in device time: no loss
        self.losses.append(float("nan") if self.device_mode is not None else float(lm.detach()))
        self.steps_done += 1
        return Span("step", "step", start, end, self.rank, args={"step": step, "policy": self.name})

    def close(self) -> None:
        """Release the engine's hooks and buffers."""
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None else dist.get_world_size()


def _record_expert_compute(module: nn.Module, timeline: Timeline, name: str) -> None:
    """A ``compute`` span named ``name`` around every forward of ``module`` (the local experts)."""
    starts: list[float] = []
    module.register_forward_pre_hook(lambda _m, _inp: starts.append(timeline.now()))
    module.register_forward_hook(lambda _m, _inp, _out: timeline.record(name, "compute", starts.pop(), timeline.now()))

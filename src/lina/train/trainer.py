"""The training loop of one rank: a MoE GPT, AdamW, a gradient-sync policy, one timeline.

Read top to bottom: ``Trainer.__init__`` builds the model and policy; ``train_step`` runs one step
(first asking the packing controller which layout to run it with, see :mod:`lina.train.packing`)
and returns its measurements; ``repack`` moves to another layout; ``evaluate`` computes validation
loss; ``state_dict`` / ``load_state_dict`` copy one rank's state in memory (same layout; the
checkpoint files, which any layout reads, are written by :mod:`lina.train.resume`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lina.comm.chunk_sweep import sweep_chunk_size
from lina.comm.gradsync import GradSync
from lina.comm.groups import ParallelGroups, build_group_set
from lina.comm.policies import make_sync
from lina.config import TrainConfig
from lina.data.corpus import Corpus, sample_batch, sample_sequences
from lina.devices import device_from
from lina.devicetime import DeviceTimeMode, TraceRouting
from lina.errors import LinaError
from lina.models.gpt import MoEGPT
from lina.moe.comm_context import ExpertComm
from lina.obs import schema
from lina.obs.report import step_breakdown
from lina.obs.timeline import Span, Timeline
from lina.policy import train_policy
from lina.train.packing import PackingController, plan_residency
from lina.train.relayout import relayout_experts


@dataclass
class StepResult:
    step: int
    loss: float  # this rank's language-model loss
    step_time_s: float
    a2a_time_s: float
    allreduce_time_s: float  # time any allreduce was in flight (may overlap compute)
    sync_wait_s: float  # time spent in the policy's finish() after backward (exposed allreduce)
    experts_per_rank: int = 0  # the packing this step ran with


class Trainer:
    """One rank's training state.

    Args:
        groups: the process groups of the layout to start with.
        group_set: every layout the run may switch to (EP size -> groups, from
            :func:`lina.comm.groups.build_group_set`); when a packing other than ``off`` needs
            layouts that are missing, they are created here (a collective).
        bounded_timeline: after every step, drop the timeline's spans that no measurement needs
            any more (all but the last ``packing_every + 1`` steps; to the timeline's spill file
            when it has one), so a long run's memory and per-step work stay flat. False keeps
            every span (benchmarks read them all at the end).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        groups: ParallelGroups,
        corpus: Corpus,
        timeline: Timeline | None = None,
        group_set: dict[int, ParallelGroups] | None = None,
        bounded_timeline: bool = False,
    ):
        self.cfg = cfg
        self._kept_step_starts: list[float] | None = [] if bounded_timeline else None
        self.corpus = corpus
        self.timeline = timeline or Timeline(groups.rank)
        self.packing = PackingController.from_config(cfg, groups.world_size)
        self.group_set = dict(group_set or {groups.ep_size: groups})
        missing = [ep for ep in self.packing.ep_sizes() if ep not in self.group_set]
        if missing and cfg.effective_packing != "off":
            self.group_set.update(build_group_set(missing, cfg.comm.timeout_s))
        self.groups = self.group_set[self.packing.initial_ep()] if cfg.effective_packing != "off" else groups
        self.comm = ExpertComm(
            group=self.groups.ep_group,
            timeline=self.timeline,
            a2a_begin=lambda name, nbytes: self.policy.a2a_begin(name, nbytes),
            a2a_end=lambda token: self.policy.a2a_end(token),
            on_backward_reaches_moe=lambda: self.policy.on_backward_reaches_moe(),
            pipeline_chunks=1,
        )
        torch.manual_seed(cfg.seed)  # same on every rank: identical non-expert parameters
        # CUDA when the process group is NCCL (one GPU per local rank), else the CPU.
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        if cfg.model.hf_model:
            from lina.hf.lm import hf_train_model

            self.model = hf_train_model(cfg.model.hf_model, self.groups, self.comm, cfg.model.seq_len).to(self.device)
        else:
            self.model = MoEGPT(cfg.model, self.comm if groups.world_size > 1 else None).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.chunk_mb = self._resolve_chunk_mb()
        self.policy: GradSync = self.make_policy(cfg.policy)
        self.place_experts()
        self.device_mode = self._device_time_mode()

    def _device_time_mode(self) -> DeviceTimeMode | None:
        """In a device-time run (``cfg.emulation.compute`` names a device): the dispatch mode every step runs
        under, and every MoE layer routes by the trace (each rank from its own place in it)."""
        if not self.cfg.emulation.device_time:
            return None
        tokens = self.cfg.batch_size * self.cfg.model.seq_len
        source = TraceRouting.from_file(
            self.cfg.emulation.routing_trace, self.cfg.model.experts, offset=self.groups.rank * tokens
        )
        for layer in self.model.moe_layers():
            layer.routing_source = source
        return DeviceTimeMode(device_from(self.cfg.emulation.compute), self.cfg.emulation.dilation)

    def _resolve_chunk_mb(self) -> float:
        """A fixed ``chunk_mb``, or for ``auto`` the result of a start-up sweep on the DP group
        (only when a policy that partitions gradients may run)."""
        if self.cfg.comm.chunk_mb != "auto":
            return float(self.cfg.comm.chunk_mb)
        if self.groups.world_size == 1 or not train_policy(self.cfg.policy).partitions_gradients:
            return 1.0
        dense_bytes = sum(
            p.numel() * p.element_size() for p in self.model.parameters() if not getattr(p, "lina_expert", False)
        )
        result = sweep_chunk_size(self.groups.dp_group, dense_bytes)
        self.chunk_sweep = result
        if self.groups.rank == 0:
            print(result.describe(), flush=True)
        return result.chosen_mb

    def make_policy(self, name: str) -> GradSync:
        """The gradient sync of the training policy ``name`` (:mod:`lina.policy`) on the current layout."""
        policy = make_sync(
            name,
            chunk_mb=self.chunk_mb,
            credit=self.cfg.comm.credit,
            model=self.model,
            dp_group=self.groups.dp_group if self.groups.world_size > 1 else None,
            expert_dp_group=self.groups.expert_dp_group,
            world_size=self.groups.world_size,
            timeline=self.timeline,
            bucket_mb=self.cfg.comm.bucket_mb,
            timeout_s=self.cfg.comm.timeout_s,
        )
        self.comm.pipeline_chunks = self.cfg.comm.pipeline_chunks if policy.pipelined else 1
        return policy

    def set_policy(self, name: str) -> None:
        """Swap the gradient-sync policy (benchmarks interleave policies on one model)."""
        self.policy.close()
        self.policy = self.make_policy(name)

    @property
    def experts_per_rank(self) -> int:
        return self.cfg.model.experts // self.groups.ep_size

    def repack(self, ep_size: int) -> None:
        """Move to the layout with EP size ``ep_size`` between steps (a collective): experts and
        their AdamW state move (:func:`lina.train.relayout.relayout_experts`), the MoE layers talk
        on the new EP group, and the gradient-sync policy is rebuilt on the new parameters and
        expert-data-parallel group. No step is lost or repeated."""
        if ep_size == self.groups.ep_size:
            return
        if ep_size not in self.group_set:
            raise LinaError(
                f"no process groups for EP size {ep_size} (created at start-up: {sorted(self.group_set)}). "
                "Fix: pass every layout the run may use in group_set (lina.comm.groups.build_group_set); "
                "a resumed run gets its checkpoint's layout from lina.train.worker"
            )
        old, new = self.groups, self.group_set[ep_size]
        name = self.policy.name
        with self.timeline.span("packing.repack", "sched", kind=schema.REPACK, from_ep=old.ep_size, to_ep=new.ep_size):
            self.policy.close()
            relayout_experts(self.model.moe_layers(), self.optimizer, old, new)
            self.groups = new
            self.policy = self.make_policy(name)
            self.place_experts()

    def place_experts(self) -> None:
        """Apply ``max_expert_memory_mb``: the MoE layers whose experts fit stay on the device, the
        others are offloaded to host memory (brought in per expert when it computes); the AdamW
        state of each expert parameter follows it."""
        layers = self.model.moe_layers()
        device = self.model.head.weight.device
        budget = int(self.cfg.packing.max_expert_memory_mb * 1024 * 1024)
        for layer, resident in zip(layers, plan_residency([m.experts.training_bytes() for m in layers], budget)):
            layer.experts.set_offloaded(not resident, device)
            for p in layer.experts.parameters():
                state = self.optimizer.state.get(p, {})
                for key, value in state.items():
                    if torch.is_tensor(value) and value.dim() > 0 and value.device != p.device:
                        state[key] = value.to(p.device)

    def expert_memory(self) -> dict:
        """Accounting of ``max_expert_memory_mb`` on this rank: what is resident, what is offloaded,
        and how often offloaded experts were brought in."""
        layers = self.model.moe_layers()
        resident = [m for m in layers if not m.experts.offloaded]
        offloaded = [m for m in layers if m.experts.offloaded]
        mb = 1024 * 1024
        return {
            "budget_mb": self.cfg.packing.max_expert_memory_mb,
            "experts_per_rank": self.experts_per_rank,
            "resident_layers": len(resident),
            "offloaded_layers": len(offloaded),
            "resident_mb": sum(m.experts.training_bytes() for m in resident) / mb,
            "offloaded_mb": sum(m.experts.training_bytes() for m in offloaded) / mb,
            "offloaded_experts": sum(m.experts.num_local for m in offloaded),
            "copies_in": sum(m.experts.offload_stats.copies_in for m in layers),
            "mb_in": sum(m.experts.offload_stats.bytes_in for m in layers) / mb,
        }

    def _maybe_repack(self, step: int) -> None:
        layers = self.model.moe_layers()
        layer_bytes = layers[0].experts.training_bytes() if layers else 0
        target = self.packing.target_ep(step, self.groups.ep_size, self.timeline, layer_bytes)
        self.repack(target)

    def _seed_gate_noise(self, step: int) -> None:
        if self.cfg.model.gate_noise > 0:
            for i, layer in enumerate(self.model.moe_layers()):
                layer.router.noise_generator = torch.Generator().manual_seed(
                    hash((self.cfg.seed, step, self.groups.rank, i)) % (2**62)
                )

    def train_step(self, step: int) -> StepResult:
        cfg = self.cfg
        self._maybe_repack(step)
        # this rank's share of the step's global batch (the same sequences on any worker count)
        x, y = sample_sequences(
            self.corpus.train, cfg.model.seq_len, cfg.seed, step, self.groups.rank * cfg.batch_size, cfg.batch_size
        )
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        self.model.train()
        self._seed_gate_noise(step)
        tl = self.timeline
        start = tl.now()
        self.policy.begin_step()
        device = self.device_mode if self.device_mode is not None else contextlib.nullcontext()
        with device:
            with tl.span("forward", "compute", kind=schema.FORWARD, phase="fwd", step=step):
                loss, lm = self.model.loss(x, y)
                self._sync_device()
            with tl.span("backward", "compute", kind=schema.BACKWARD, phase="bwd", step=step):
                loss.backward()
                self._sync_device()
            sync_start = tl.now()
            self.policy.finish()
            sync_end = tl.now()
            tl.record("gradsync.finish", "sched", sync_start, sync_end, kind=schema.SYNC_WAIT, step=step)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._sync_device()
        end = tl.now()
        tl.record("step", "step", start, end, kind=schema.STEP, step=step, policy=self.policy.name)
        b = step_breakdown(tl.spans(since_s=start), Span("step", "step", start, end, tl.rank, kind=schema.STEP))
        self._drop_old_spans(start)
        lm_value = float("nan") if self.device_mode is not None else float(lm.detach())  # uncomputed in device time
        return StepResult(
            step,
            lm_value,
            end - start,
            b["a2a_total"],
            b["allreduce_in_flight"],
            b["allreduce_exposed"],
            self.experts_per_rank,
        )

    def _sync_device(self) -> None:
        """Device time: wait for the emulated device, so a span ends when its compute does."""
        if self.device_mode is not None:
            self.device_mode.sync()

    def _drop_old_spans(self, step_start: float) -> None:
        """With ``bounded_timeline``: keep the spans of the last ``packing.every + 1`` steps (the
        packing controller measures the last ``every``), drop older ones."""
        if self._kept_step_starts is None:
            return
        self._kept_step_starts.append(step_start)
        keep = max(2, self.packing.every + 1)
        if len(self._kept_step_starts) > keep:
            del self._kept_step_starts[:-keep]
            self.timeline.drop_before(self._kept_step_starts[0])

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over ``eval_batches`` batches (every rank takes part); NaN in a
        device-time run, which computes no loss."""
        cfg = self.cfg
        if self.device_mode is not None:
            return float("nan")
        self.model.eval()
        losses = []
        for i in range(cfg.eval_batches):
            x, y = sample_batch(
                self.corpus.val, cfg.batch_size, cfg.model.seq_len, cfg.seed + 7919, i, self.groups.rank
            )
            losses.append(float(self.model.loss(x.to(self.device), y.to(self.device))[1]))
        value = torch.tensor(sum(losses) / len(losses), device=self.device)
        if self.groups.world_size > 1:
            dist.all_reduce(value)
            value /= self.groups.world_size
        return float(value)

    def mean_over_ranks(self, value: float) -> float:
        t = torch.tensor(value, dtype=torch.float64, device=self.device)
        if self.groups.world_size > 1:
            dist.all_reduce(t)
            t /= self.groups.world_size
        return float(t)

    def state_dict(self, step: int) -> dict:
        return {
            "step": step,
            "rank": self.groups.rank,
            "world_size": self.groups.world_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "packing": {
                "ep_size": self.groups.ep_size,
                "experts_per_rank": self.experts_per_rank,
                "controller": self.packing.state_dict(),
            },
        }

    def load_state_dict(self, state: dict) -> int:
        """Rebuild the checkpoint's layout (its expert shapes), restore, and return the next step
        to run."""
        packing = state.get("packing", {})
        self.repack(int(packing.get("ep_size", self.groups.ep_size)))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.packing.load_state_dict(packing.get("controller", {}))
        self.place_experts()
        return int(state["step"]) + 1

"""The training loop of one rank: a MoE GPT, AdamW, a gradient-sync policy, one timeline.

Read top to bottom: ``Trainer.__init__`` builds the model and policy; ``train_step`` runs one step
and returns its measurements; ``evaluate`` computes validation loss; ``state_dict`` /
``load_state_dict`` feed checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from lina.comm.chunk_sweep import sweep_chunk_size
from lina.comm.groups import ParallelGroups
from lina.comm.gradsync import GradSync
from lina.comm.policies import make_policy
from lina.config import TrainConfig
from lina.data.corpus import Corpus, sample_batch
from lina.models.gpt import MoEGPT
from lina.moe.comm_context import ExpertComm
from lina.obs.timeline import Timeline, union_length


@dataclass
class StepResult:
    step: int
    loss: float  # this rank's language-model loss
    step_time_s: float
    a2a_time_s: float
    allreduce_time_s: float  # time any allreduce was in flight (may overlap compute)
    sync_wait_s: float  # time spent in the policy's finish() after backward (exposed allreduce)


class Trainer:
    def __init__(self, cfg: TrainConfig, groups: ParallelGroups, corpus: Corpus, timeline: Timeline | None = None):
        self.cfg = cfg
        self.groups = groups
        self.corpus = corpus
        self.timeline = timeline or Timeline(groups.rank)
        self.comm = ExpertComm(
            group=groups.ep_group,
            timeline=self.timeline,
            a2a_begin=lambda name, nbytes: self.policy.a2a_begin(name, nbytes),
            a2a_end=lambda token: self.policy.a2a_end(token),
            on_backward_reaches_moe=lambda: self.policy.on_backward_reaches_moe(),
            pipeline_chunks=1,
        )
        torch.manual_seed(cfg.seed)  # same on every rank: identical non-expert parameters
        self.model = MoEGPT(cfg.model, self.comm if groups.world_size > 1 else None)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.chunk_mb = self._resolve_chunk_mb()
        self.policy: GradSync = self.make_policy(cfg.schedule)

    def _resolve_chunk_mb(self) -> float:
        """A fixed ``chunk_mb``, or for ``auto`` the result of a start-up sweep on the DP group
        (only when a policy that partitions gradients may run)."""
        if self.cfg.chunk_mb != "auto":
            return float(self.cfg.chunk_mb)
        if self.groups.world_size == 1 or self.cfg.schedule != "lina":
            return 1.0
        dense_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters() if not getattr(p, "lina_expert", False))
        result = sweep_chunk_size(self.groups.dp_group, dense_bytes)
        self.chunk_sweep = result
        if self.groups.rank == 0:
            print(result.describe(), flush=True)
        return result.chosen_mb

    def make_policy(self, name: str) -> GradSync:
        policy = make_policy(
            name,
            chunk_mb=self.chunk_mb,
            model=self.model,
            dp_group=self.groups.dp_group if self.groups.world_size > 1 else None,
            expert_dp_group=self.groups.expert_dp_group,
            world_size=self.groups.world_size,
            timeline=self.timeline,
            bucket_mb=self.cfg.bucket_mb,
            timeout_s=self.cfg.timeout_s,
        )
        self.comm.pipeline_chunks = self.cfg.pipeline_chunks if policy.pipelined else 1
        return policy

    def set_policy(self, name: str) -> None:
        """Swap the gradient-sync policy (benchmarks interleave policies on one model)."""
        self.policy.close()
        self.policy = self.make_policy(name)

    def _seed_gate_noise(self, step: int) -> None:
        if self.cfg.model.gate_noise > 0:
            for i, layer in enumerate(self.model.moe_layers()):
                layer.router.noise_generator = torch.Generator().manual_seed(hash((self.cfg.seed, step, self.groups.rank, i)) % (2**62))

    def train_step(self, step: int) -> StepResult:
        cfg = self.cfg
        x, y = sample_batch(self.corpus.train, cfg.batch_size, cfg.model.seq_len, cfg.seed, step, self.groups.rank)
        self.model.train()
        self._seed_gate_noise(step)
        tl = self.timeline
        start = tl.now()
        self.policy.begin_step()
        with tl.span("forward", "compute", step=step):
            loss, lm = self.model.loss(x, y)
        with tl.span("backward", "compute", step=step):
            loss.backward()
        sync_start = tl.now()
        self.policy.finish()
        sync_end = tl.now()
        tl.record("gradsync.finish", "sched", sync_start, sync_end, step=step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        end = tl.now()
        tl.record("step", "step", start, end, step=step, policy=self.policy.name)
        spans = [s for s in tl.spans(since_s=start) if s.end_s <= end + 1.0]
        a2a = union_length([(s.start_s, s.end_s) for s in spans if s.cat == "a2a"])  # micro-ops overlap
        allreduce = union_length([(s.start_s, min(s.end_s, end)) for s in spans if s.cat == "allreduce"])
        return StepResult(step, float(lm.detach()), end - start, a2a, allreduce, sync_end - sync_start)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over ``eval_batches`` batches (every rank takes part)."""
        cfg = self.cfg
        self.model.eval()
        losses = []
        for i in range(cfg.eval_batches):
            x, y = sample_batch(self.corpus.val, cfg.batch_size, cfg.model.seq_len, cfg.seed + 7919, i, self.groups.rank)
            losses.append(float(self.model.loss(x, y)[1]))
        value = torch.tensor(sum(losses) / len(losses))
        if self.groups.world_size > 1:
            dist.all_reduce(value)
            value /= self.groups.world_size
        return float(value)

    def mean_over_ranks(self, value: float) -> float:
        t = torch.tensor(value, dtype=torch.float64)
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
        }

    def load_state_dict(self, state: dict) -> int:
        """Restore and return the next step to run."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["step"]) + 1

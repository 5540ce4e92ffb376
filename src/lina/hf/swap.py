"""Expert parallelism for a transformers model: each sparse MoE block becomes a lina MoE layer
holding only this rank's experts, so a user's own training loop runs with any lina policy.

    groups = lina.comm.groups.build_groups(ep_size, timeout_s=120)   # after init_process_group
    ep = expert_parallel(model, groups, policy="lina")
    for batch in data:
        ep.begin_step()
        loss = model(**batch).loss + ep.aux_loss()
        loss.backward()
        ep.finish()          # gradients are the mean over every rank
        optimizer.step(); optimizer.zero_grad()
        ep.update_routing_bias()   # DeepSeek-V3's auxiliary-loss-free balancing
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lina.comm.gradsync import GradSync
from lina.comm.groups import ParallelGroups
from lina.comm.policies import make_sync
from lina.hf.blocks import block_shape, new_layer, state_from_block
from lina.hf.errors import HFModelError
from lina.hf.families import Family, family_of
from lina.moe.comm_context import ExpertComm
from lina.moe.layer import MoELayer
from lina.obs.timeline import Timeline


def single_process_groups() -> ParallelGroups:
    """The groups of one process holding every expert."""
    return ParallelGroups(0, 1, 1, None, None, None)


def resolve_groups(group: Any) -> ParallelGroups:
    """None (one process), a :class:`ParallelGroups` (from :func:`lina.comm.groups.build_groups`),
    or one process group used for expert parallelism over every rank of the job."""
    if group is None:
        return single_process_groups()
    if isinstance(group, ParallelGroups):
        return group
    if isinstance(group, dist.ProcessGroup):
        world = dist.get_world_size()
        if dist.get_world_size(group) != world:
            raise HFModelError(
                "a single process group must span every rank (pure expert parallelism). "
                "Fix: for expert x data parallelism pass lina.comm.groups.build_groups(ep_size, timeout_s)"
            )
        return ParallelGroups(
            dist.get_rank(), world, world, group if world > 1 else None, group if world > 1 else None, None
        )
    raise HFModelError(
        f"group {group!r} is neither None, a ParallelGroups nor a process group. "
        "Fix: pass lina.comm.groups.build_groups(ep_size, timeout_s)"
    )


def sparse_blocks(model: nn.Module, family: Family) -> list[tuple[int, nn.Module]]:
    """(decoder layer index, sparse block) of every MoE layer of a transformers causal LM."""
    layers = model.model.layers
    return [(i, layer.mlp) for i, layer in enumerate(layers) if type(layer.mlp).__name__ == family.sparse_block]


class ExpertParallel:
    """What :func:`expert_parallel` did to a model, and the per-step calls of a training loop.

    Attributes:
        model: the (modified) transformers model.
        family: its :class:`~lina.hf.families.Family`.
        groups: the process groups; ``comm``: the MoE layers' shared expert-parallel context.
        layers: the lina MoE layers in order; ``layer_ids``: their decoder layer indices.
        policy: the gradient-sync policy (None: no gradient sync, e.g. one process or inference).
    """

    def __init__(
        self,
        model: nn.Module,
        family: Family,
        groups: ParallelGroups,
        comm: ExpertComm,
        layers: list[MoELayer],
        layer_ids: list[int],
        pipeline_chunks: int,
    ):
        self.model, self.family, self.groups, self.comm = model, family, groups, comm
        self.layers, self.layer_ids = layers, layer_ids
        self.pipeline_chunks = pipeline_chunks
        self.policy: GradSync | None = None

    def set_policy(
        self, name: str, chunk_mb: float = 1.0, credit: int = 1, bucket_mb: float = 25.0, timeout_s: float = 120.0
    ) -> GradSync:
        """Use the named gradient-sync policy (``sequential``, ``ddp-overlap``, ``tutel``, ``lina``);
        pipelined policies split every exchange into ``pipeline_chunks`` micro-ops."""
        if self.policy is not None:
            self.policy.close()
        g = self.groups
        self.policy = make_sync(
            name,
            chunk_mb=chunk_mb,
            credit=credit,
            model=self.model,
            dp_group=g.dp_group if g.world_size > 1 else None,
            expert_dp_group=g.expert_dp_group,
            world_size=g.world_size,
            timeline=self.comm.timeline,
            bucket_mb=bucket_mb,
            timeout_s=timeout_s,
        )
        self.comm.pipeline_chunks = self.pipeline_chunks if self.policy.pipelined else 1
        return self.policy

    def begin_step(self) -> None:
        if self.policy is not None:
            self.policy.begin_step()

    def finish(self) -> None:
        """After backward: every gradient becomes the mean over all ranks (needs a policy when
        there is more than one rank)."""
        if self.policy is not None:
            self.policy.finish()
        elif self.groups.world_size > 1:
            raise HFModelError(
                "gradients are not synchronised without a policy. Fix: expert_parallel(..., policy='lina')"
            )

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' router losses of the last forward (0 with the default weights)."""
        losses = [m.aux_loss for m in self.layers]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def update_routing_bias(self) -> list[torch.Tensor]:
        """Apply every correction-bias router's balance update from the load of the steps since
        the last call, summed over all ranks (no-op for routers without one). Returns the loads
        used, FloatTensor[E] per such layer."""
        group = self.groups.dp_group if self.groups.world_size > 1 else None
        return [
            layer.router.update_correction_bias(group) for layer in self.layers if layer.router.spec.correction_bias
        ]

    def close(self) -> None:
        if self.policy is not None:
            self.policy.close()


def make_comm(groups: ParallelGroups, handle_ref: list, timeline: Timeline | None = None) -> ExpertComm:
    """The shared expert-parallel context; its hooks call the handle's policy (set later)."""

    def policy():
        return handle_ref[0].policy if handle_ref and handle_ref[0].policy is not None else None

    return ExpertComm(
        group=groups.ep_group,
        timeline=timeline if timeline is not None else Timeline(groups.rank, enabled=False),
        a2a_begin=lambda name, nbytes: policy().a2a_begin(name, nbytes) if policy() else None,
        a2a_end=lambda token: policy().a2a_end(token) if policy() else None,
        on_backward_reaches_moe=lambda: policy().on_backward_reaches_moe() if policy() else None,
        pipeline_chunks=1,
    )


def match_dtypes(layer: MoELayer, router_dtype: torch.dtype, dtype: torch.dtype) -> None:
    """Give the router the checkpoint's router dtype (DeepSeek-V3 keeps it in fp32) and the experts
    and shared experts the model's dtype."""
    layer.router.gate.to(router_dtype)
    layer.experts.to(dtype)
    if layer.shared is not None:
        layer.shared.to(dtype)


def expert_parallel(
    model: nn.Module,
    group: Any = None,
    policy: str | None = None,
    *,
    pipeline_chunks: int = 2,
    balance_loss_weight: float = 0.0,
    bias_update_rate: float = 0.0,
    grouped_mm: bool = False,
    timeline: Timeline | None = None,
    **policy_kwargs,
) -> ExpertParallel:
    """Swap every sparse MoE block of ``model`` (a transformers causal LM of a supported family),
    in place, for a lina MoE layer holding this rank's experts, sliced from the block's weights.

    Args:
        group: None (one process, every expert; logits equal the model's), a
            :class:`~lina.comm.groups.ParallelGroups`, or one process group spanning every rank.
        policy: gradient-sync policy name, or None (set one later with ``set_policy``).
        pipeline_chunks: all-to-all micro-ops per exchange under pipelined policies; without a
            policy, the exchange is pipelined when this is > 1 and there is an EP group.
        balance_loss_weight: weight of lina's balance loss in :meth:`ExpertParallel.aux_loss`.
        bias_update_rate: DeepSeek-V3's correction-bias update step (0: fixed bias).
        grouped_mm: compute experts with grouped matrix multiplies where supported.
        policy_kwargs: ``chunk_mb``, ``credit``, ``bucket_mb``, ``timeout_s`` of the policy.
    Returns:
        :class:`ExpertParallel`.
    """
    family = family_of(model.config)
    groups = resolve_groups(group)
    shape = block_shape(family, model.config, grouped_mm=grouped_mm, bias_update_rate=bias_update_rate)
    ref: list = []
    comm = make_comm(groups, ref, timeline)
    layers, ids = [], []
    for index, (i, block) in enumerate(sparse_blocks(model, family)):
        layer = new_layer(shape, comm if groups.ep_group is not None else None, balance_loss_weight)
        match_dtypes(layer, block.gate.weight.dtype, block.experts.gate_up_proj.dtype)
        layer.load_state_dict(state_from_block(block, family, layer.experts.global_ids))
        layer.layer_index = index
        model.model.layers[i].mlp = layer.to(block.gate.weight.device)
        layers.append(layer)
        ids.append(i)
    if not layers:
        raise HFModelError(f"no {family.sparse_block} found in the model. Fix: pass a {family.model_class}")
    if groups.ep_group is not None:
        comm.pipeline_chunks = pipeline_chunks
    handle = ExpertParallel(model, family, groups, comm, layers, ids, pipeline_chunks)
    ref.append(handle)
    if policy is not None:
        handle.set_policy(policy, **policy_kwargs)
    return handle

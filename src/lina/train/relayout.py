"""The one-off move of experts to a new packing layout: parameters and AdamW state travel in one
all-to-all within the old expert-parallel groups (:func:`relayout_experts`), decided by the packing
controller of :mod:`lina.train.packing`."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lina.comm.groups import ParallelGroups
from lina.errors import LinaError
from lina.moe.experts import LocalExperts

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def expert_sources(world: int, experts: int, old_ep: int, new_ep: int) -> list[list[tuple[int, int]]]:
    """Where each rank gets its experts of the new layout from.

    Returns, for every rank r, ``[(source rank, expert id)]`` in r's new local order. The source of
    expert e is its holder under ``old_ep`` inside r's own old EP group (every old EP group holds
    every expert once), so the move is one all-to-all within the old EP groups.
    """
    old_per_rank, new_per_rank = experts // old_ep, experts // new_ep
    out = []
    for r in range(world):
        group_start = r - r % old_ep
        first = (r % new_ep) * new_per_rank
        out.append([(group_start + e // old_per_rank, e) for e in range(first, first + new_per_rank)])
    return out


def _payload(layers, optimizer: torch.optim.Optimizer, local: int, with_state: bool) -> torch.Tensor:
    """One row: expert ``local`` of this rank in every MoE layer: per parameter its weights, then
    (``with_state``) AdamW's exp_avg, exp_avg_sq and step. -> FloatTensor[K]."""
    parts = []
    for layer in layers:
        for name in layer.experts.param_names:
            p = getattr(layer.experts, name)
            parts.append(p.detach()[local].reshape(-1))
            if with_state:
                st = optimizer.state[p]
                parts += [st[m][local].reshape(-1) for m in ADAM_MOMENTS]
                parts.append(st["step"].reshape(1).to(p.dtype))
    return torch.cat(parts)


def _unpack(rows: torch.Tensor, layers, with_state: bool) -> list[dict[str, tuple[torch.Tensor, dict]]]:
    """Inverse of :func:`_payload` for E_l' rows ``[E_l', K]`` -> per layer, per parameter name:
    (stacked weights, AdamW state or {})."""
    offset = 0

    def take(count: int) -> torch.Tensor:  # the next ``count`` columns, [E_l', count]
        nonlocal offset
        offset += count
        return rows[:, offset - count : offset]

    out = []
    for layer in layers:
        entry = {}
        for name in layer.experts.param_names:
            shape = getattr(layer.experts, name).shape[1:]
            weights = take(shape.numel()).reshape(-1, *shape).clone()
            state = {}
            if with_state:
                state = {m: take(shape.numel()).reshape(-1, *shape).clone() for m in ADAM_MOMENTS}
                steps = take(1).reshape(-1)
                if not bool((steps == steps[0]).all()):
                    raise LinaError(
                        f"expert packing: experts of {name} arrive with different AdamW steps {steps.tolist()}; they "
                        "cannot share one parameter"
                    )
                state["step"] = steps[0].clone().to(torch.float32)
            entry[name] = (weights, state)
        out.append(entry)
    return out


def relayout_experts(layers, optimizer: torch.optim.Optimizer, old: ParallelGroups, new: ParallelGroups) -> None:
    """Move every MoE layer's experts from layout ``old`` to layout ``new`` (a collective: every rank
    calls it at the same point, between steps, with no gradient pending).

    Each rank receives the parameters and AdamW state (exp_avg, exp_avg_sq, step) of its new experts
    in one ``all_to_all_single`` within its old EP group (rows = experts, every MoE layer in a row),
    rebuilds each layer's :class:`LocalExperts` for its new global ids, points the layers' shared
    :class:`~lina.moe.comm_context.ExpertComm` at the new EP group, and swaps the new parameters
    into the optimizer in place of the old ones (same positions, so optimizer state dicts keep
    their order).
    """
    if not layers or old.ep_size == new.ep_size:
        return
    experts = layers[0].num_experts
    rank, world = old.rank, old.world_size
    sources = expert_sources(world, experts, old.ep_size, new.ep_size)
    old_ids = layers[0].experts.global_ids
    old_params = [p for layer in layers for p in layer.experts.parameters()]
    has_state = [len(optimizer.state.get(p, {})) > 0 for p in old_params]
    if any(has_state) and not all(has_state):
        raise LinaError(
            "expert packing: only some expert parameters have optimizer state; move between steps, "
            "after optimizer.step()"
        )
    with_state = all(has_state)
    peers = range(old.ep_group_start, old.ep_group_start + old.ep_size)
    send_ids = [[e for s, e in sources[q] if s == rank] for q in peers]
    rows = [_payload(layers, optimizer, old_ids.index(e), with_state) for ids in send_ids for e in ids]
    width = sum(getattr(layer.experts, n)[0].numel() for layer in layers for n in layer.experts.param_names)
    width = width * 3 + sum(len(layer.experts.param_names) for layer in layers) if with_state else width
    device = old_params[0].device
    send = torch.stack(rows) if rows else torch.empty(0, width, device=device)
    recv_ids = [[e for s, e in sources[rank] if s == q] for q in peers]
    if old.ep_group is None:
        recv = send
    else:
        recv = send.new_empty(sum(map(len, recv_ids)), width)
        dist.all_to_all_single(recv, send, [len(i) for i in recv_ids], [len(i) for i in send_ids], group=old.ep_group)
    row_of = {e: i for i, e in enumerate(e for ids in recv_ids for e in ids)}
    new_ids = [e for _, e in sources[rank]]
    unpacked = _unpack(recv[[row_of[e] for e in new_ids]], layers, with_state)
    new_params, new_states = [], []
    for layer, entry in zip(layers, unpacked):
        layer.comm.group = new.ep_group
        names = layer.experts.param_names
        fresh = LocalExperts.from_tensors(new_ids, *(entry[n][0] for n in names), spec=layer.experts.spec).to(device)
        layer.set_experts(fresh)
        new_params += [getattr(fresh, n) for n in names]
        new_states += [entry[n][1] for n in names]
    _swap_optimizer_params(optimizer, old_params, new_params, new_states)


def _swap_optimizer_params(optimizer: torch.optim.Optimizer, old: list, new: list, states: list[dict]) -> None:
    index = {id(o): n for o, n in zip(old, new)}
    found = 0
    for group in optimizer.param_groups:
        swapped = [index.get(id(p), p) for p in group["params"]]
        found += sum(1 for p in group["params"] if id(p) in index)
        group["params"] = swapped
    if found != len(old):
        raise LinaError(f"expert packing: {len(old) - found} expert parameters are not in the optimizer")
    for o in old:
        optimizer.state.pop(o, None)
    for n, st in zip(new, states):
        if st:
            optimizer.state[n] = {k: v.to(n.device) for k, v in st.items()} if st["exp_avg"].device != n.device else st

"""A deliberately broken gradient-sync policy: odd ranks allreduce the two halves of the dense
gradients in the opposite order to even ranks. The halves have the same size, so Gloo pairs them
without complaint and sums the wrong tensors (NCCL would do the same or hang); only the
collective check (:mod:`lina.comm.collective_check`) notices. For tests."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lina.comm.collective_check import collective_label
from lina.comm.gradsync import SequentialSync, _grad, _unflatten_into


class MisorderedSync(SequentialSync):
    """Dense gradients as one flat buffer ``[2, n/2]`` (zero-padded), allreduced half by half:
    half 0 then half 1 on even ranks, half 1 then half 0 on odd ranks."""

    name = "misordered"

    def finish(self) -> None:
        grads = [_grad(p) for p in self.dense_params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        halves = F.pad(flat, (0, flat.numel() % 2)).view(2, -1).clone()
        order = (0, 1) if dist.get_rank() % 2 == 0 else (1, 0)
        for i in order:
            with collective_label(f"half{i}"):
                dist.all_reduce(halves[i], group=self.dp_group)
        _unflatten_into(halves.reshape(-1)[: flat.numel()], grads, self.world_size)
        self._sync_experts_blocking()

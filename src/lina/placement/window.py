"""Placement for a window of decode steps: which experts are resident where is planned once per
window (from the recent real counts, with Lina's rule: replicas of popular experts in the spare
slots, unpopular ones packed, more than 4 experts per device where the model has them), and each
step's tokens are then routed among the resident replicas only, so no weight moves inside a
window. A window's residents are known a whole window ahead, so their weights can move in the
background while the previous window is served."""

from __future__ import annotations

import torch

from lina.placement.core import Placement
from lina.placement.lina import _water_fill


def route_among_resident(resident: Placement, counts: torch.Tensor) -> Placement:
    """This step's placement: ``resident``'s holdings, each replicated expert's token-slots split
    among its replicas so the devices' loads level out (water-filling, busiest experts first).

    Args:
        resident: the window's plan; only the experts it holds on each device may be used.
        counts: Tensor[E] this step's real token-slots per expert.
    Returns:
        a :class:`Placement` that holds a subset of ``resident``'s experts on each device.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    holds = resident.holds
    share = holds.double() / holds.sum(1, keepdim=True)
    single = holds.sum(1) == 1
    device_load = (counts[:, None] * share * single[:, None]).sum(0)
    replicated = [int(e) for e in torch.nonzero(~single).flatten()]
    for e in sorted(replicated, key=lambda e: -float(counts[e])):
        if counts[e] <= 0:
            continue
        devices = torch.nonzero(holds[e]).flatten()
        parts = torch.tensor(_water_fill(device_load[devices].tolist(), float(counts[e])), dtype=torch.float64)
        share[e] = 0.0
        share[e, devices] = parts / parts.sum()
        device_load[devices] += parts
    return Placement(resident.num_experts, resident.num_devices, share)

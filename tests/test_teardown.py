"""Leaving the process group frees every Gloo group and joins its threads before the
interpreter shuts down (a group alive at shutdown can abort a finished worker)."""

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from lina.cluster.teardown import leave_distributed


def _gloo_threads() -> list[str]:
    names = (open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    return [n for n in names if "gloo" in n]


class _Holder:
    """An object in a reference cycle that keeps a process group alive (as an engine and its
    policy can)."""

    def __init__(self, group):
        self.group, self.me = group, self


def test_leave_distributed_frees_groups_held_by_reference_cycles(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1, timeout=timedelta(seconds=30)
    )
    try:
        holder = _Holder(dist.new_group([0]))
        out = [None]
        dist.all_gather_object(out, {"tensor": torch.ones(3)}, group=holder.group)
        assert out[0]["tensor"].sum() == 3 and _gloo_threads()
        del holder, out
    finally:
        leave_distributed()
    assert not dist.is_initialized()
    assert _gloo_threads() == []

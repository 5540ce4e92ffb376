"""A dispatch mode in which compute takes device time instead of CPU time.

Under :class:`DeviceTimeMode` every aten op that reads or writes floating-point tensors is not
computed: its outputs are fresh uninitialised tensors of the right shapes, dtypes and strides
(found by running the op on meta tensors), and the op is charged its device time, ``max(FLOPs /
sustained FLOP/s, bytes / sustained memory bandwidth)`` of the :class:`lina.devices.DeviceSpec`,
times the dilation. The device is asynchronous, as a GPU is to its host: charges add to a device
clock that the host sleeps on (never spins) while it keeps ``lead_s`` of work queued, and fully
before a collective (``c10d`` ops run for real, on real tensors of real sizes) and at
:meth:`DeviceTimeMode.sync`. Views, integer ops (routing indices, counts, splits), ops with
integer results and ops on a few elements (scalars, step counters) run for real: they decide what
the collectives move and what the host reads back.

Numbers computed under the mode are meaningless (uninitialised memory): a device-time run never
reports a loss or an output.
"""

from __future__ import annotations

import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from lina.devices import DeviceSpec
from lina.devicetime.costs import op_cost, tensors_of

#: a device-time run whose device idles more than this share of its time waiting for the host's
#: dispatch is bound by this machine's CPU: its step times do not describe the device
HOST_BOUND_LIMIT = 0.05

#: ops whose every input and output has at most this many elements run for real (step counters,
#: scalars the host reads back); their device time is nil
TINY_NUMEL = 256


def _to_meta(x):
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    return x


class DeviceTimeMode(TorchDispatchMode):
    """Charge compute ops device time instead of computing them.

    Args:
        device: the accelerator whose roofline times the ops.
        dilation: K; every device duration is multiplied by it (the emulated links are divided by
            it elsewhere, so the emulated cluster runs the real one's schedule K times slower).
        float_bytes: bytes per floating-point element on the device (2: bf16).
        lead_s: the queued device work the host keeps ahead of the device: it sleeps once the device
            clock is more than twice this ahead, and wakes this much before the device is done.

    Attributes:
        device_s: device seconds charged so far (undilated); ops: ops charged; real_ops: ops run;
        host_gap_s: wall seconds the device idled because the host fell behind.
    """

    def __init__(self, device: DeviceSpec, dilation: float = 1.0, float_bytes: int = 2, lead_s: float = 0.02):
        super().__init__()
        if not dilation > 0:
            raise ValueError(f"dilation {dilation} must be > 0")
        self.device = device
        self.dilation = float(dilation)
        self.float_bytes = float_bytes
        self.lead_s = lead_s
        self.device_free_s = 0.0  # perf_counter time at which the emulated device is idle again
        self.device_s = 0.0
        self.ops = 0
        self.real_ops = 0
        self.host_gap_s = 0.0  # device idle between two compute ops with no collective between them
        self._after_collective = True
        _load_meta_kernels()

    # --- the device clock ----------------------------------------------------------------------
    def op_seconds(self, flops: float, nbytes: float) -> float:
        """Undilated device time of one op."""
        return max(flops / self.device.flops, nbytes / self.device.mem_bytes_per_s)

    def charge(self, seconds: float) -> None:
        """Queue ``seconds`` (undilated) of device work; sleep if the device is too far ahead."""
        now = time.perf_counter()
        if now > self.device_free_s and not self._after_collective:
            self.host_gap_s += now - self.device_free_s  # the host, not the device, set the pace here
        self._after_collective = False
        self.device_free_s = max(self.device_free_s, now) + seconds * self.dilation
        self.device_s += seconds
        ahead = self.device_free_s - now
        if ahead > 2 * self.lead_s:  # keep a lead of queued work, as a GPU's launch queue does,
            time.sleep(ahead - self.lead_s)  # so the host's own overhead and late wake-ups hide behind it

    def host_bound_share(self) -> float:
        """Share of the dilated device time the device sat idle waiting for the host's dispatch
        (not for a collective): above a few percent the dilation is too small for this machine."""
        busy = self.device_s * self.dilation
        return self.host_gap_s / busy if busy > 0 else 0.0

    def expect_idle(self) -> None:
        """The device's idle time up to the next op is not the host's dispatch overhead (the
        caller ran something outside the mode, e.g. a collective or scheduling, in between)."""
        self._after_collective = True

    def sync(self) -> None:
        """Wait until the emulated device has finished everything charged (a device synchronize)."""
        ahead = self.device_free_s - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)

    def __exit__(self, *exc):
        self.sync()
        return super().__exit__(*exc)

    # --- dispatch ------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "aten":  # collectives (c10d) and everything not a compute kernel
            self.sync()
            self.real_ops += 1
            self._after_collective = True  # a wait for the network is not the host's overhead
            return func(*args, **kwargs)
        inputs = tensors_of((args, kwargs))
        if func.is_view or not any(t.is_floating_point() for t in inputs):
            self.real_ops += 1
            return func(*args, **kwargs)
        try:
            meta_out = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
        except (NotImplementedError, RuntimeError, TypeError):
            meta_out = None  # an op without a meta kernel cannot be shaped without running: it runs for real
        outs = tensors_of(meta_out)
        tiny = max(t.numel() for t in inputs + outs) <= TINY_NUMEL
        if meta_out is None or tiny or any(not t.is_floating_point() for t in outs):
            # results that decide something (indices, masks, scalars such as the optimizer's step
            # count) and bookkeeping too small to cost anything: computed
            self.real_ops += 1
            return func(*args, **kwargs)
        flops, nbytes = op_cost(func.__name__.split(".")[0], args, kwargs, meta_out, self.float_bytes)
        self.charge(self.op_seconds(flops, nbytes))
        self.ops += 1
        return _results(func, args, kwargs, meta_out, inputs[0].device)


def _load_meta_kernels() -> None:
    """The first op on meta tensors loads torch's meta registrations (seconds); do it up front
    rather than inside the first charged op."""
    x = torch.empty(2, 2, device="meta")
    torch.nn.functional.gelu(torch.mm(x, x)).sum()


def _results(func, args: tuple, kwargs: dict, meta_out, device: torch.device):
    """What ``func`` would have returned: the written arguments for in-place and ``out=`` ops,
    fresh uninitialised tensors shaped like ``meta_out`` otherwise."""
    schema = func._schema
    written = {}
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            written[frozenset(arg.alias_info.before_set)] = value

    def fresh(x):
        if isinstance(x, torch.Tensor):
            return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
        return x

    if not written:
        return tree_map(fresh, meta_out)
    returns = schema.returns
    if not returns:
        return None
    metas = list(meta_out) if len(returns) > 1 else [meta_out]
    out = []
    for ret, meta in zip(returns, metas):
        alias = ret.alias_info
        out.append(written.get(frozenset(alias.before_set)) if alias is not None else tree_map(fresh, meta))
    return tuple(out) if len(returns) > 1 else out[0]

"""Device-time compute: every compute op of a model takes the time a GPU would take for its shapes
(a roofline from :mod:`lina.devices`, times a dilation factor), by sleeping instead of computing,
while tensors keep their shapes and every collective moves its real bytes.

- :mod:`~lina.devicetime.costs`: FLOPs and bytes of one aten op from its shapes;
- :mod:`~lina.devicetime.mode`: :class:`DeviceTimeMode`, the dispatch mode that charges them;
- :mod:`~lina.devicetime.routing`: routing taken from a recorded trace, since a gate fed
  uncomputed activations decides nothing meaningful.
"""

from lina.devicetime.costs import op_cost
from lina.devicetime.mode import DeviceTimeMode
from lina.devicetime.routing import TraceRouting

__all__ = ["DeviceTimeMode", "TraceRouting", "op_cost"]

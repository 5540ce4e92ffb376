"""Lina's expert-packing rule, as far as both the trainer's packing controller
(:mod:`lina.train.packing`) and the simulator (:mod:`lina.sim.train`) follow it.

Packing doubles the experts per rank while one expert-FFN micro-op is shorter than one
all-to-all micro-op; a doubling that makes the mean step slower than ``REVERT_MARGIN`` is undone
(packing goes back to the fastest layout measured and settles).
"""

REVERT_MARGIN = 0.05  # a doubling that makes the mean step slower than this is undone

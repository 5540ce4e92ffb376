"""The paper's reported numbers (Li et al., USENIX ATC'23; see LINA.md), as reference constants.

These are the PAPER'S measurements on its 16-A100 testbed, shown beside the simulator's own
predictions and always labelled as the paper's. Nothing in the simulator reads them.
"""

PAPER = "Lina paper (ATC'23)"

# share of step time spent in all-to-all under DeepSpeed, training, averaged over models
A2A_SHARE_AVG = 0.341
A2A_SHARE_BY_EXPERTS = {2: 0.334, 16: 0.445}

# step-time speedup of Lina (with packing) over DeepSpeed, by number of experts, and average
SPEEDUP_BY_EXPERTS = {2: 1.71, 4: 1.37, 8: 1.73, 16: 1.47}
SPEEDUP_AVG = 1.57
SPEEDUP_MAX = 1.73

# ablations without packing
PRIORITY_ONLY_RANGE = (1.10, 1.30)
PRIORITY_ONLY_AVG = 1.24
PRIORITY_PARTITION_RANGE = (1.36, 1.42)

# backward all-to-all time, DeepSpeed / Lina, by experts
BWD_A2A_SPEEDUP_BY_EXPERTS = {4: 2.21, 8: 2.39, 16: 2.31}

# share of all-to-all time during which compute is busy
COMPUTE_BUSY_IN_A2A_NO_PACKING = (0.33, 0.36)
COMPUTE_BUSY_IN_A2A_PACKING = (0.79, 0.86)

# inference, Lina vs DeepSpeed
INFER_P95_SPEEDUP_AVG = 1.63
INFER_MEDIAN_SPEEDUP_RANGE = (1.36, 1.54)
INFER_MEDIAN_SPEEDUP_AVG = 1.45

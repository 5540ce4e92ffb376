"""lina: distributed Mixture-of-Experts training and inference without the all-to-all bottleneck."""

__version__ = "0.1.0"

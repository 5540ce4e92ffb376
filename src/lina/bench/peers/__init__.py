"""Peers: other frameworks' real implementations, run beside lina's policies in ``lina bench train``."""

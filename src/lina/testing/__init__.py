"""Helpers for running small multi-process Gloo jobs in tests and quick checks."""

"""Benchmarks: each measures, interleaves policies, and reports medians with the regime."""

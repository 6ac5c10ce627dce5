"""Benchmark helpers: analytic FLOP counts (``flops``) and measured matmul peaks (``peak``).

Importing this package imports nothing heavy: each submodule is imported on its own.
"""

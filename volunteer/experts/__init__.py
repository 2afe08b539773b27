"""Experts: the explicit zoo (ffn, transformer, nop), backends (module + optimizer + update
counter), checkpoints and the cached throughput self-benchmark.
"""

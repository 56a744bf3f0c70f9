"""Parity: the same programs under ProcessPoolExecutor and DistributedExecutor.

Layer: compat harness. See ``compat/README.md``.
"""

"""Julia's ``Distributed`` reference page, example by example, rewritten with distexec.

Layer: compat harness. See ``compat/README.md``.
"""

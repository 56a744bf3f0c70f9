"""CPython's ``test_concurrent_futures``, run with another executor as ``ProcessPoolExecutor``.

Layer: compat harness, never shipped. See ``compat/README.md`` and ``run_stdlib_suite``.
"""

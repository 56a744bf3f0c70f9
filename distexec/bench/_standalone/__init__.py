"""Benchmark modules that import nothing but the standard library.

Layer: tooling (``python -m distexec.bench``), outside the library's layers. Imports: stdlib.

The modules here are importable two ways: as ``distexec.bench._standalone.NAME`` and, with this
directory on ``sys.path``, as the top-level ``NAME``. The benchmark uses the second way for every
backend whose workers are not distexec's, so those workers never import the distexec package
(whose import time would otherwise be charged to ProcessPoolExecutor, loky and the raw floors).
The raw floor's worker (``dxb_echo``) runs as a script from this directory for the same reason.
"""

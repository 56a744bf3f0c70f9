"""Startup hook of the CPython suite harness: an executor substituted into ``concurrent.futures``.

Layer: compat harness, never shipped. Imports: stdlib only (it runs in every interpreter of a
test's process tree, before anything else).

``compat.cpython.run_stdlib_suite`` puts this folder on ``PYTHONPATH`` of each test's child
process. Every interpreter started from there inherits it and runs this file at startup: the
test process itself, the interpreters that ``test.support.script_helper.assert_python_ok``
starts, and the pool's own workers. When ``COMPAT_CPYTHON_EXECUTOR`` names an executor class
as ``module:qualname`` and ``COMPAT_CPYTHON_EXECUTOR_NAME`` gives its ``__name__``, both
``concurrent.futures.ProcessPoolExecutor`` and ``concurrent.futures.<__name__>`` resolve to
that class, so ``from concurrent.futures import DistributedExecutor`` works in a child
interpreter exactly as ``from concurrent.futures import ProcessPoolExecutor`` does.

The class is imported lazily, on the first lookup of either name, through the package's own
module ``__getattr__`` (PEP 562), so interpreters that never ask (workers, the resource
tracker) do not import it. ``concurrent.futures.process.ProcessPoolExecutor`` is left alone:
it stays the real one. Any other ``sitecustomize`` further down ``sys.path`` still runs.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys

# Read by compat.cpython.run_stdlib_suite and compat.cpython._child too; keep in step.
EXECUTOR_ENV = "COMPAT_CPYTHON_EXECUTOR"
EXECUTOR_NAME_ENV = "COMPAT_CPYTHON_EXECUTOR_NAME"


def _resolve(spec: str) -> object:
    """Import ``module:qualname`` and return the object it names."""
    module_name, _, qualname = spec.partition(":")
    obj: object = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _install(spec: str, name: str) -> None:
    """Make ``ProcessPoolExecutor`` and *name* in ``concurrent.futures`` resolve to *spec*."""
    import concurrent.futures as package

    original = package.__getattr__
    names = {"ProcessPoolExecutor", name}
    resolving = False  # True while *spec* is being imported: it may itself ask for the real one

    def __getattr__(attr: str) -> object:
        nonlocal resolving
        if attr not in names or resolving:
            return original(attr)
        resolving = True
        try:
            executor = _resolve(spec)
        except Exception as exc:
            vars(package).pop("ProcessPoolExecutor", None)  # no real one cached in passing
            raise ImportError(f"compat harness: cannot load the executor {spec!r}: {exc}") from exc
        finally:
            resolving = False
        for each in names:
            setattr(package, each, executor)  # cached: __getattr__ is not asked again
        return executor

    package.__getattr__ = __getattr__  # type: ignore[method-assign]


def _chain() -> None:
    """Run the ``sitecustomize`` that this one shadows, if there is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


if os.environ.get(EXECUTOR_ENV):
    _install(os.environ[EXECUTOR_ENV], os.environ.get(EXECUTOR_NAME_ENV, "ProcessPoolExecutor"))
_chain()

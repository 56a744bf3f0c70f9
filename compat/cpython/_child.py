"""The child side of the CPython suite harness: list the tests, or run one and record it.

Layer: compat harness, never shipped. Imports: stdlib, and at run time the Debian copy of
CPython's ``test.test_concurrent_futures`` (found through the ``test`` symlink that
``run_stdlib_suite`` puts on ``PYTHONPATH``), plus the executor under test.

Started by ``compat.cpython.run_stdlib_suite`` with an environment in which the startup hook
``site_hook/sitecustomize.py`` has already made ``concurrent.futures.ProcessPoolExecutor`` the
executor under test::

    python -m compat.cpython._child discover OUT.json
    python -m compat.cpython._child run CLASS.test_name OUT.json

``discover`` writes every process-pool test id with its start method and the private
``ProcessPoolExecutor`` attributes its source reads. ``run`` runs one test with unittest,
writes its outcome, then returns so that the interpreter exits normally (an executor that
hangs interpreter exit shows up as a timeout in the parent).
"""

from __future__ import annotations

import ast
import faulthandler
import importlib
import inspect
import json
import os
import signal
import sys
import textwrap
import unittest
from collections.abc import Callable, Sequence
from pathlib import Path

SUITE_MODULE = "test.test_concurrent_futures"
# The same names as in site_hook/sitecustomize.py (test_stdlib_suite checks that they agree).
EXECUTOR_ENV = "COMPAT_CPYTHON_EXECUTOR"
EXECUTOR_NAME_ENV = "COMPAT_CPYTHON_EXECUTOR_NAME"
# The parent sends this before it kills a test that ran past its timeout.
DUMP_SIGNAL = signal.SIGUSR1


def resolve(spec: str) -> object:
    """Import ``module:qualname`` and return the object it names."""
    module_name, sep, qualname = spec.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"executor spec {spec!r} is not of the form module:qualname")
    obj: object = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def ppe_private_names() -> frozenset[str]:
    """Private names of the real ``ProcessPoolExecutor``: its ``self._x`` state and ``_methods``.

    Taken from the interpreter's own ``concurrent/futures/process.py`` rather than listed by
    hand, so they follow the stdlib: ``_processes``, ``_executor_manager_thread``,
    ``_call_queue``, ``_broken``, ``_max_workers``, ``_mp_context``, ...
    """
    from concurrent.futures import process

    tree = ast.parse(textwrap.dedent(inspect.getsource(process.ProcessPoolExecutor)))
    names: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and _is_private(node.attr)
        ):
            names.add(node.attr)
        elif isinstance(node, ast.FunctionDef) and _is_private(node.name):
            names.add(node.name)
    return frozenset(names)


def private_reads(method: Callable[..., object], private: frozenset[str]) -> list[str]:
    """The names in *private* that *method*'s own source reads as ``<anything>.<name>``.

    Only the test method's body is scanned, not the helpers it calls: in 3.11 the one helper
    that reads private state, ``ExecutorDeadlockTest._fail_on_deadlock``, runs only after the
    test has already failed on a deadlock.
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
    found = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in private
    }
    return sorted(found)


def _substitute() -> object:
    return resolve(os.environ[EXECUTOR_ENV])


def discover(out: Path) -> int:
    """Write ``{"tests": [{"id", "start_method", "private_attrs"}, ...]}`` to *out*."""
    import concurrent.futures

    suite = importlib.import_module(SUITE_MODULE)
    executor = _substitute()
    found = concurrent.futures.ProcessPoolExecutor
    if found is not executor:
        print(
            f"error: concurrent.futures.ProcessPoolExecutor is {found!r}, not {executor!r}:"
            " the sitecustomize hook did not run",
            file=sys.stderr,
        )
        return 2
    private = ppe_private_names()
    loader = unittest.TestLoader()
    tests: list[dict[str, object]] = []
    for name, cls in sorted(vars(suite).items()):
        # The process-pool variants are exactly the test classes built on a mixin with a start
        # method: ProcessPoolForkMixin, ProcessPoolForkserverMixin, ProcessPoolSpawnMixin.
        if not (isinstance(cls, type) and issubclass(cls, unittest.TestCase)):
            continue
        start_method = getattr(cls, "ctx", None)
        if not isinstance(start_method, str):
            continue
        if getattr(cls, "executor_type", None) is not executor:
            print(f"error: {name}.executor_type is not {executor!r}", file=sys.stderr)
            return 2
        for test_name in loader.getTestCaseNames(cls):
            tests.append(
                {
                    "id": f"{name}.{test_name}",
                    "start_method": start_method,
                    "private_attrs": private_reads(getattr(cls, test_name), private),
                }
            )
    out.write_text(json.dumps({"tests": tests}, indent=1))
    return 0


def _exception_line(traceback_text: str) -> str:
    """The ``Type: message`` line of the last traceback in *traceback_text*, cut to 300 chars."""
    lines = traceback_text.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    after = lines[starts[-1] + 1 :] if starts else lines
    header = next((line for line in after if line and not line[0].isspace()), "")
    return header if len(header) <= 300 else header[:297] + "..."


def _outcome(result: unittest.TestResult) -> tuple[str, str]:
    """Map a one-test unittest result to (outcome, detail)."""
    if result.failures:
        return "failed", _exception_line(result.failures[0][1])
    if result.errors:
        return "error", _exception_line(result.errors[0][1])
    if result.unexpectedSuccesses:
        return "failed", "unexpected success"
    if result.skipped:
        return "skipped", result.skipped[0][1]
    if result.testsRun != 1:
        return "error", f"ran {result.testsRun} tests, expected 1"
    return "passed", ""


def run(test_id: str, out: Path) -> int:
    """Run ``test.test_concurrent_futures.<test_id>`` and write its outcome to *out*."""
    faulthandler.register(DUMP_SIGNAL, all_threads=True)
    import concurrent.futures

    # Debian's suite, through the `test` symlink on PYTHONPATH; there are no stubs for it.
    from test import support  # type: ignore[import-not-found]
    from test.support import script_helper  # type: ignore[import-not-found]

    # assert_python_ok() starts its interpreters with -I unless the interpreter "requires its
    # environment". This one does: without PYTHONPATH the child finds neither the `test`
    # symlink nor the hook that substitutes the executor. This is the escape hatch the
    # function's docstring describes (setting PYTHONHOME would have the same effect).
    script_helper.interpreter_requires_environment = lambda: True
    if concurrent.futures.ProcessPoolExecutor is not _substitute():
        print("error: the sitecustomize hook did not substitute the executor", file=sys.stderr)
        return 2
    suite = unittest.defaultTestLoader.loadTestsFromName(f"{SUITE_MODULE}.{test_id}")
    result = unittest.TextTestRunner(stream=sys.stderr, verbosity=2).run(suite)
    outcome, detail = _outcome(result)
    record = {"outcome": outcome, "detail": detail, "env_changed": support.environment_altered}
    out.write_text(json.dumps(record))
    sys.stdout.flush()
    return 0


def main(argv: Sequence[str]) -> int:
    """Dispatch ``discover OUT`` or ``run TEST_ID OUT``."""
    match list(argv):
        case ["discover", out]:
            return discover(Path(out))
        case ["run", test_id, out]:
            return run(test_id, Path(out))
        case _:
            print(__doc__, file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

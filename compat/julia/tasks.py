"""Functions the Julia examples run on workers, importable there by name.

Layer: compat harness. Imports: stdlib.

Julia's examples use anonymous functions such as ``x -> iseven(x) ? error("foo") : x``; a
Python lambda cannot raise, so those bodies live here. Attempt counters are files in a
folder the test gives, because a retried element may run on any worker.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

#: A module global that ``clear(..., module="compat.julia.tasks")`` sets to None on workers.
CLEAR_ME: object = "defined in compat.julia.tasks"


def error_if_even(x: int) -> int:
    """Julia: ``x -> iseven(x) ? error("foo") : x`` (``error`` raises an ``ErrorException``,
    whose Python counterpart is ``RuntimeError``)."""
    if x % 2 == 0:
        raise RuntimeError("foo")
    return x


def count_attempt(folder: str, key: object) -> int:
    """Record one more attempt at *key*; return how many there have been, this one included."""
    path = Path(folder) / str(key)
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return len(path.read_text().splitlines())


def attempts(folder: str, key: object) -> int:
    path = Path(folder) / str(key)
    return len(path.read_text().splitlines()) if path.exists() else 0


def fail_first(folder: str, failures: int, x: int) -> int:
    """``x * 10``, after failing the first *failures* attempts at *x* (cluster-wide)."""
    n = count_attempt(folder, x)
    if n <= failures:
        raise ConnectionError(f"attempt {n} at {x} failed")
    return x * 10


def inexact_or_transient(folder: str, x: int) -> float:
    """Odd *x*: an "InexactError" (ValueError) every time. Even *x*: fails once, then x / 2."""
    if x % 2:
        raise ValueError(f"InexactError: {x} / 2 is not an integer")
    if count_attempt(folder, x) == 1:
        raise ConnectionError(f"transient failure at {x}")
    return x / 2


def wait_for_file(path: str, value: object = None, timeout: float = 30.0) -> object:
    """Block until *path* exists, then return *value* (a gate the test opens)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} was never opened")
        time.sleep(0.005)
    return value


def touch(path: str) -> None:
    Path(path).touch()


def spin(started: str, seconds: float = 30.0) -> str:
    """Say it started (a file), then run until interrupted; Ctrl-C is what should end it."""
    Path(started).touch()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.005)
    return "ran to the end: not interrupted"


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def echo(*args: object, **kwargs: object) -> tuple[tuple[object, ...], dict[str, object]]:
    return args, kwargs


class PickleCounter:
    """Counts, in the process that pickles it, how many times it was pickled."""

    count = 0

    def __reduce__(self) -> tuple[object, ...]:
        PickleCounter.count += 1
        return (PickleCounter, ())

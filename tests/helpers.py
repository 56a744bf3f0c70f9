"""Small helpers for tests: waiting on conditions, and functions to run on workers."""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def wait_until(pred: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll *pred* until it is true; fail with *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        if pred():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def identity(x: object) -> object:
    return x


def ospid() -> int:
    return os.getpid()


def die(code: int = 3) -> None:
    os._exit(code)


def raise_value_error(msg: str) -> None:
    raise ValueError(msg)


class BadInit(Exception):
    """Pickles but does not unpickle: ``__init__`` takes two arguments, ``args`` holds one."""

    def __init__(self, a: object, b: object) -> None:
        super().__init__(f"{a}-{b}")


def raise_bad_init() -> None:
    raise BadInit(1, 2)


class UnpicklableOnLoad:
    """Pickles fine here, raises when unpickled (on the other side)."""

    def __reduce__(self) -> tuple[object, ...]:
        return (_fail_on_load, ())


def _fail_on_load() -> None:
    raise RuntimeError("refusing to be unpickled")


class ExitOnLoad:
    """Unpickling it raises SystemExit: it must fail one call, not the process."""

    def __reduce__(self) -> tuple[object, ...]:
        return (_exit_on_load, ())


def _exit_on_load() -> None:
    raise SystemExit(7)


def return_exit_on_load() -> ExitOnLoad:
    return ExitOnLoad()

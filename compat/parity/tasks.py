"""Functions the parity scenarios submit, importable by every worker.

Layer: compat harness. Imports: stdlib.

``ProcessPoolExecutor`` pickles functions by reference (module and name), so whatever a
scenario submits must live in an importable module, here; ``DistributedExecutor`` would take
them by value too, but the point is to run the same program under both.
"""

from __future__ import annotations

import os
import sys
import threading
import time

#: Set in each worker by :func:`init_worker`; read back by :func:`init_value`.
_init_value: object = None


def square(x: int) -> int:
    return x * x


def add(*xs: int) -> int:
    return sum(xs)


def power(base: int, exp: int) -> int:
    return base**exp


def identity(x: object) -> object:
    return x


def echo_kwargs(*args: object, **kwargs: object) -> tuple[tuple[object, ...], dict[str, object]]:
    return args, kwargs


def sleep_then(x: object, seconds: float) -> object:
    time.sleep(seconds)
    return x


def inverse_sleep(x: int) -> int:
    """Later elements finish first: map must still yield them in input order."""
    time.sleep(0.02 * (5 - x % 5))
    return x


def fail_at(x: int, bad: int = 3) -> int:
    if x == bad:
        raise ValueError(f"element {x} is bad")
    return x * 10


def raise_key_error(key: str) -> None:
    raise KeyError(key)


def raise_os_error(errno: int, text: str, filename: str) -> None:
    raise OSError(errno, text, filename)


class ParityError(Exception):
    """A user-defined exception with an extra attribute, to check it survives the trip."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code


def raise_parity_error(message: str, code: int) -> None:
    raise ParityError(message, code)


class BadInit(Exception):
    """Pickles, but does not unpickle: ``__init__`` takes two arguments, ``args`` holds one."""

    def __init__(self, a: object, b: object) -> None:
        super().__init__(f"{a}-{b}")


def raise_bad_init() -> None:
    raise BadInit(1, 2)


def raise_system_exit(code: int) -> None:
    sys.exit(code)


def return_lock() -> object:
    return threading.Lock()


def wait_for_file(path: str, value: object, timeout: float = 30.0) -> object:
    """Block until *path* exists (a gate the test opens), then return *value*."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} was never opened")
        time.sleep(0.005)
    return value


def getpid(_: object = None) -> int:
    return os.getpid()


def init_worker(value: object, record_dir: str | None = None) -> None:
    """An initializer: remember *value*; leave a file named after this pid in *record_dir*."""
    global _init_value
    _init_value = value
    if record_dir is not None:
        with open(os.path.join(record_dir, f"{os.getpid()}"), "a") as f:
            f.write("init\n")


def init_value(_: object = None) -> tuple[int, object]:
    return os.getpid(), _init_value


def failing_init(message: str) -> None:
    raise RuntimeError(message)


def crash(code: int = 1) -> None:
    os._exit(code)

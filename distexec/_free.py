"""Julia's generic verbs as free functions: fetch, wait, isready, put, take.

Layer: L5. Imports: stdlib.

Each works on a Future, a RemoteChannel or a Channel by calling the method of the same name;
``fetch`` of anything else returns it unchanged, as Julia's ``fetch(x) = x``.
"""

from __future__ import annotations

from typing import Any


def fetch(x: Any, timeout: float | None = None) -> Any:
    """Wait for and return the value of a Future or channel; other objects come back as they are.

    Julia: ``fetch(x)``.
    """
    method = getattr(x, "fetch", None)
    if method is None:
        return x
    return method() if timeout is None else method(timeout=timeout)


def wait(x: Any, timeout: float | None = None) -> Any:
    """Wait until *x* is ready (a Future's value exists, a channel has an item).

    Julia: ``wait(x)``.
    """
    method = getattr(x, "wait", None)
    if method is None:
        raise TypeError(f"cannot wait on a {type(x).__name__}")
    return method() if timeout is None else method(timeout=timeout)


def isready(x: Any) -> bool:
    """Whether *x* has a value ready, without blocking. Julia: ``isready(x)``."""
    method = getattr(x, "isready", None)
    if method is None:
        raise TypeError(f"{type(x).__name__} has no notion of readiness")
    return bool(method())


def put(x: Any, value: Any) -> Any:
    """Put *value* into a channel, or set a Future (once). Julia: ``put!(x, v)``."""
    method = getattr(x, "put", None)
    if method is None:
        raise TypeError(f"cannot put into a {type(x).__name__}")
    return method(value)


def take(x: Any) -> Any:
    """Remove and return an item from a channel. Julia: ``take!(x)``."""
    method = getattr(x, "take", None)
    if method is None:
        raise TypeError(f"cannot take from a {type(x).__name__}")
    return method()

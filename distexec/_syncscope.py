"""The innermost active ``sync()`` block of the running thread, and registration with it.

Layer: L0 leaf. Imports: stdlib.

``remotecall`` (and so ``spawnat``, ``remotecall_wait``), ``distributed`` and ``async_`` call
:func:`register` with what they start; when a ``with sync():`` block is active in the
current context, it will wait for that. Julia's ``@sync`` finds its tasks lexically (the
macros look for a local ``sync_varname``); here the scope lives in a ``ContextVar``, so
calls from functions called inside the block count too, as do calls made by ``async_``
tasks started in the block (they run in a copy of its context). Other threads do not.

This is on the hot path of every ``remotecall``: with no active block, :func:`register` is
one ``ContextVar.get`` and a comparison.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["SyncScope", "current", "register", "suspended"]


class SyncScope:
    """What one ``sync()`` block has to wait for, in the order it was started."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        # list.append is atomic under the GIL; the waiter reads by index, so no lock.
        self.items: list[object] = []


_current: ContextVar[SyncScope | None] = ContextVar("distexec_sync_scope", default=None)


def register(item: object) -> None:
    """Hand *item* (something with ``.exception()``) to the active ``sync()`` block, if any."""
    scope = _current.get()
    if scope is not None:
        scope.items.append(item)


def current() -> SyncScope | None:
    """The innermost active scope of this context, or ``None``."""
    return _current.get()


def enter(scope: SyncScope | None) -> object:
    """Make *scope* the active one; returns the token for :func:`leave`."""
    return _current.set(scope)


def leave(token: object) -> None:
    """Restore the scope that was active before the matching :func:`enter`."""
    _current.reset(token)  # type: ignore[arg-type]


@contextmanager
def suspended() -> Iterator[None]:
    """Calls made inside are not registered with any ``sync()`` block.

    For library code that starts remote calls and waits for them itself (``everywhere``,
    ``pmap``, pools): an enclosing ``sync()`` must not wait for, or re-raise, those.
    """
    token = _current.set(None)
    try:
        yield
    finally:
        _current.reset(token)

"""Client side of calls: remotecall, remotecall_fetch, remotecall_wait, remote_do.

Layer: L5 calls. Imports: L0-L4.

Library parameters are positional-only, so every user keyword reaches the user's function.
A call aimed at this very process runs here, without pickling, with the same error wrapping
as a remote one (Julia does the same).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from . import _cluster, refs
from ._ids import WorkerId
from ._syncscope import register as _sync_register
from .errors import CapturedException, RemoteException

P = ParamSpec("P")
R = TypeVar("R")


def _check_callable(fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"expected a callable to run remotely, got {type(fn).__name__}")


def _is_pool(target: object) -> bool:
    # Pools live a layer above; they are recognised by the methods they offer.
    return not isinstance(target, int) and hasattr(target, "remotecall_fetch")


def remotecall(
    fn: Callable[..., Any], pid: WorkerId | Any, /, *args: Any, **kwargs: Any
) -> refs.Future:
    """Start ``fn(*args, **kwargs)`` on process *pid* and return a :class:`Future` at once.

    Julia: ``remotecall(f, id, args...; kwargs...)``. The value stays on *pid* until fetched
    (small values are sent along when ready). *pid* may be a pool: a worker is borrowed from
    it until the call finishes (Julia's ``remotecall(f, pool, ...)``); the same holds for the
    other functions of this family.

    Raises:
        SerializationError: *fn* or an argument cannot be pickled; nothing was sent.
        ProcessExitedException: *pid* is gone.
        ValueError: *pid* is not in the group.
    """
    _check_callable(fn)
    if _is_pool(pid):
        return pid.remotecall(fn, *args, **kwargs)  # type: ignore[union-attr,no-any-return]
    g = _cluster.group()
    pid = g.check_pid(pid)
    fut = refs.Future._for_call(pid)
    fut.set_running_or_notify_cancel()
    if pid == g.myid:
        g.runner.submit(refs.run_local, fut, fn, args, kwargs)
    else:
        try:
            g.call_future(pid, fn, args, kwargs, fut.rrid, fut)
        except BaseException:
            fut._claims = 0  # nothing reached the owner: there is nothing to give back
            raise
    _sync_register(fut)  # an enclosing ``with sync():`` waits for it (O(1), free without one)
    return fut


def remotecall_fetch(
    fn: Callable[P, R], pid: WorkerId | Any, /, *args: P.args, **kwargs: P.kwargs
) -> R:
    """Call ``fn(*args, **kwargs)`` on process *pid* and wait for its value.

    Julia: ``remotecall_fetch(f, id, args...; kwargs...)``; faster than
    ``fetch(remotecall(...))`` because the value comes straight back.

    Raises:
        RemoteException: *fn* raised on *pid*; the original is ``exc.captured.ex``.
        ProcessExitedException: *pid* died before replying.
        SerializationError: the call cannot be pickled; nothing was sent.
    """
    _check_callable(fn)
    if _is_pool(pid):
        return pid.remotecall_fetch(fn, *args, **kwargs)  # type: ignore[union-attr,no-any-return]
    g = _cluster.group()
    pid = g.check_pid(pid)  # before the shortcut: True or 1.0 are not pid 1
    if pid == g.myid:
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            raise RemoteException(pid, CapturedException.capture(exc)) from exc
    return g.call_fetch(pid, fn, args, kwargs)  # type: ignore[return-value]


def remotecall_wait(
    fn: Callable[..., Any], pid: WorkerId | Any, /, *args: Any, **kwargs: Any
) -> refs.Future:
    """Start ``fn`` on *pid*, wait until it has finished there, and return its Future.

    Julia: ``remotecall_wait(f, id, args...; kwargs...)``. Raises ``RemoteException`` if it failed.
    """
    if _is_pool(pid):
        return pid.remotecall_wait(fn, *args, **kwargs)  # type: ignore[union-attr,no-any-return]
    fut = remotecall(fn, pid, *args, **kwargs)
    fut.wait()
    return fut


def remote_do(fn: Callable[..., Any], pid: WorkerId | Any, /, *args: Any, **kwargs: Any) -> None:
    """Run ``fn(*args, **kwargs)`` on *pid* and expect nothing back, not even an error.

    Julia: ``remote_do(f, id, args...; kwargs...)``. Calls to one process start in order.
    """
    _check_callable(fn)
    if _is_pool(pid):
        return pid.remote_do(fn, *args, **kwargs)  # type: ignore[union-attr,no-any-return]
    g = _cluster.group()
    pid = g.check_pid(pid)
    if pid == g.myid:
        g.runner.submit(_run_and_report, fn, args, kwargs)
        return
    g.call_do(pid, fn, args, kwargs)


def _run_and_report(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    try:
        fn(*args, **kwargs)
    except BaseException as exc:
        _cluster._log(f"remote_do failed here: {type(exc).__name__}: {exc}")

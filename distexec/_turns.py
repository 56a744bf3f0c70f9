"""Calls that run one at a time, in the order they arrived (``CallMode.ORDERED``).

Layer: L1 util. Imports: stdlib.

An executor sends a worker its next call before the current one has finished, to hide the
round trip; the worker must still run them one after another, in order, as a
``ProcessPoolExecutor`` process does. The link's reader takes a ticket for each such call as
it decodes it (so tickets follow arrival order), and the call waits for its ticket's turn.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

_turn = threading.Condition()  # guards: _serving, _given, _abandoned
_serving = 0  # the ticket whose call may run now
_given = 0  # tickets handed out so far
_abandoned: set[int] = set()


def take() -> int:
    """The next ticket; called by a link's reader, in arrival order."""
    global _given
    with _turn:
        t = _given
        _given += 1
        return t


def _advance_locked() -> None:
    global _serving
    _serving += 1
    while _serving in _abandoned:
        _abandoned.discard(_serving)
        _serving += 1
    _turn.notify_all()


def run(
    ticket: int, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> Any:
    """Wait for *ticket*'s turn, run ``fn(*args, **kwargs)``, then pass the turn on (also if
    it raised, or if the wait was interrupted: a call never blocks the ones after it)."""
    if _serving != ticket:  # (a racy look that only saves taking the lock in the common case)
        try:
            with _turn:
                while _serving != ticket:
                    _turn.wait()
        except BaseException:  # interrupted while waiting: give the turn up
            with _turn:
                if _serving == ticket:
                    _advance_locked()
                else:
                    _abandoned.add(ticket)
            raise
    try:
        return fn(*args, **kwargs)
    finally:
        with _turn:
            _advance_locked()

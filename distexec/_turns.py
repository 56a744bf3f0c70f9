"""Calls that run one at a time, in the order they arrived (``CallMode.ORDERED``).

Layer: L1 util. Imports: stdlib.

An executor sends a worker its next call before the current one has finished, to hide the
round trip; the worker must still run them one after another, in order, as a
``ProcessPoolExecutor`` process does. The link's reader takes a ticket for each such call as
it decodes it (so tickets follow arrival order), and the call waits for its ticket's turn.

A call passes the turn on once its answer is written, not when its function returns: so when
a worker dies, of the calls it had not answered only the oldest can have started, and an
executor may run the others elsewhere (the answers written before are read before the EOF).
"""

from __future__ import annotations

import threading

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


def wait(ticket: int) -> None:
    """Wait for *ticket*'s turn. Its holder must call :func:`done` when its call has ended
    and its answer is written. An interrupted wait gives the turn up (a call never blocks
    the ones after it)."""
    if _serving == ticket:  # (a racy look that only saves taking the lock in the common case)
        return
    try:
        with _turn:
            while _serving != ticket:
                _turn.wait()
    except BaseException:
        with _turn:
            if _serving == ticket:
                _advance_locked()
            else:
                _abandoned.add(ticket)
        raise


def done() -> None:
    """Pass the turn on to the next ticket."""
    with _turn:
        _advance_locked()

"""The trivial functions every benchmark case runs on the workers.

Layer: tooling (``python -m distexec.bench``). Imports: stdlib only, so a worker that unpickles
them by reference pays for no import beyond this module.
"""

from __future__ import annotations

import os


def identity(x: object) -> object:
    """Return *x*: the request and the reply carry the same value."""
    return x


def nbytes(a: object) -> int:
    """Return ``a.nbytes``: the array crosses one way and an int comes back."""
    return int(a.nbytes)  # type: ignore[attr-defined]


def worker_pid(_: object = None) -> int:
    """Return the pid of the process that ran the call."""
    return os.getpid()


#: On a worker: an object left there by ``stash``, the way ``@everywhere x = ...`` leaves one.
_stash: object = None


def stash(a: object) -> int:
    """Keep *a* in this worker's module global (for ``stashed_item``); return ``a.nbytes``."""
    global _stash
    _stash = a
    return int(a.nbytes)  # type: ignore[attr-defined]


def stashed_item(i: int) -> float:
    """Return ``float(a[i])`` of the stashed array: a module-level function that uses data
    already on the worker, what a closure over the same array does in one call."""
    return float(_stash[i])  # type: ignore[index]


def unstash(_: object = None) -> None:
    """Drop the stashed object."""
    global _stash
    _stash = None

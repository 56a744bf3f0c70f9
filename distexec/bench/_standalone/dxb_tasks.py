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

"""The errors for a lost worker, which are also ``BrokenProcessPool``: part of
:mod:`distexec.errors`, defined here so that they load on first use.

Layer: L0 leaf. Imports: stdlib, distexec.errors.

``BrokenProcessPool`` lives in ``concurrent.futures.process``, whose import pulls in
``multiprocessing`` and its connection and queue modules (a few milliseconds) that a worker
never needs to start. :mod:`distexec.errors` hands these classes out from its module
``__getattr__``, so ``distexec.errors.WorkerLostError`` and ``distexec.WorkerLostError`` are
these, always subclasses of ``BrokenProcessPool``; their ``__module__`` says
``distexec.errors``, where pickles, reprs and tracebacks name them.
"""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool

from .errors import ProcessExitedException

__all__ = ["WorkerDiedError", "WorkerLostError", "WorkerUnresponsiveError"]


class WorkerLostError(ProcessExitedException, BrokenProcessPool):
    """A worker was lost while it ran this call; only the calls it held fail.

    Also a ``BrokenProcessPool``, so code written for ``ProcessPoolExecutor`` that
    catches that keeps working.
    """

    __module__ = "distexec.errors"


class WorkerDiedError(WorkerLostError):
    """The worker process is gone, or its link is.

    ``exitcode`` is the process's exit status when this process started it (negative:
    ``-signal``, as ``subprocess`` says it), else ``None``; ``stderr_tail`` holds the last
    lines it wrote to stderr (a crash's faulthandler report among them); ``reason`` says what
    is known in words ("killed by SIGSEGV", "connection reset by peer", ...).
    """

    __module__ = "distexec.errors"

    def __init__(
        self,
        message: str = "",
        *,
        pid: int = -1,
        exitcode: int | None = None,
        stderr_tail: str = "",
        reason: str = "",
    ) -> None:
        super().__init__(message, pid=pid)
        self.exitcode = exitcode
        self.stderr_tail = stderr_tail
        self.reason = reason

    @property
    def signal(self) -> int | None:
        """The signal that killed the worker, if one did."""
        return -self.exitcode if self.exitcode is not None and self.exitcode < 0 else None


class WorkerUnresponsiveError(WorkerDiedError):
    """The worker stopped answering heartbeats (stopped, hung, or holding the GIL in a long C
    call); it was killed and the calls it held failed. See ``distexec._heartbeat``."""

    __module__ = "distexec.errors"

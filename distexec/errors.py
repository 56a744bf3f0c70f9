"""Every exception distexec raises, in one tree.

Layer: L0 leaf. Imports: stdlib; ``distexec._worker_lost`` (on first use).

```text
DistexecError(Exception)
├── RemoteException              user code raised on worker .pid; .captured holds it (Julia name)
├── ProcessExitedException       the worker died or its connection was lost (Julia name)
│   └── WorkerLostError          + concurrent.futures.process.BrokenProcessPool: executor-facing
│       └── WorkerDiedError      the process is gone: .exitcode / .signal / .stderr_tail / .reason
│           └── WorkerUnresponsiveError  it stopped answering heartbeats, so it was killed
├── ClusterClosedError           *you* closed it: rmprocs(), shutdown(), close()
├── ChannelClosedError           put/take on a closed (Remote)Channel (Julia InvalidStateException)
├── LaunchError                  a manager could not start a worker; carries the stderr tail
│   └── WorkerTimeoutError       no banner / no connection within the worker timeout
├── ProtocolError                + ConnectionError: a bad frame, an unknown tag
│   ├── AuthenticationError      the peer does not know the cluster cookie
│   ├── VersionMismatchError     the peer runs another distexec / Python / cloudpickle
│   └── FrameTooLargeError       a length prefix over the frame cap
├── SerializationError           + pickle.PicklingError, TypeError: would not pickle
├── DeserializationError         + pickle.UnpicklingError: a value would not unpickle here
├── TaskTimeoutError             + TimeoutError: a call ran past its task_timeout; .pid, .timeout
└── ClusterError                 + RuntimeError: a misuse Julia reports with ErrorException
```

Operations over several processes (``everywhere``, ``sync``) raise a builtin
``ExceptionGroup`` of these (Julia's ``CompositeException``).

``WorkerLostError`` and its subclasses are defined in :mod:`distexec._worker_lost` and
handed out here by the module's ``__getattr__`` on first use: their base
``BrokenProcessPool`` costs an import of ``multiprocessing`` that a starting worker skips.
"""

from __future__ import annotations

import pickle
import traceback
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._worker_lost import WorkerDiedError as WorkerDiedError
    from ._worker_lost import WorkerLostError as WorkerLostError
    from ._worker_lost import WorkerUnresponsiveError as WorkerUnresponsiveError

__all__ = [
    "AuthenticationError",
    "CapturedException",
    "ChannelClosedError",
    "ClusterClosedError",
    "ClusterError",
    "DeserializationError",
    "DistexecError",
    "FrameTooLargeError",
    "LaunchError",
    "ProcessExitedException",
    "ProtocolError",
    "RemoteException",
    "RemoteTraceback",
    "SerializationError",
    "TaskTimeoutError",
    "UnpicklableRemoteError",
    "VersionMismatchError",
    "WorkerDiedError",
    "WorkerLostError",
    "WorkerTimeoutError",
    "WorkerUnresponsiveError",
]


class DistexecError(Exception):
    """Base class of every error distexec raises itself."""


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in another process.

    Set as ``__cause__`` of re-raised exceptions, as ``ProcessPoolExecutor`` does, so the
    remote frames print under "The above exception was the direct cause of ...".
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class UnpicklableRemoteError(DistexecError):
    """Stands in for a remote exception that could not cross the wire.

    Keeps what could be kept: the original type's qualified name and its message.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.type_name, self.message))


class CapturedException:
    """An exception and the text of the traceback it had where it was raised.

    Julia: ``CapturedException``. ``ex`` is the original exception when it survived
    pickling, else an ``UnpicklableRemoteError`` with its type name and message.
    """

    __slots__ = ("ex", "tb_text", "type_name")

    def __init__(self, ex: BaseException, tb_text: str, type_name: str | None = None) -> None:
        self.ex = ex
        self.tb_text = tb_text
        self.type_name = type_name or _qualname(type(ex))

    @classmethod
    def capture(cls, ex: BaseException) -> CapturedException:
        """Capture *ex* with its traceback, making sure the result pickles."""
        tb_text = "".join(traceback.format_exception(ex))
        type_name = _qualname(type(ex))
        return cls(portable_exception(ex), tb_text, type_name)

    def __reduce__(self) -> tuple[object, ...]:
        return (CapturedException, (self.ex, self.tb_text, self.type_name))

    def __repr__(self) -> str:
        return f"CapturedException({self.type_name}: {self.ex})"


def _qualname(tp: type) -> str:
    mod = tp.__module__
    return tp.__qualname__ if mod == "builtins" else f"{mod}.{tp.__qualname__}"


def portable_exception(ex: BaseException) -> BaseException:
    """Return *ex* if it survives a pickle round trip, else a text stand-in.

    The round trip runs here, at the sender, so that an exception whose ``__init__``
    takes other arguments than it gives ``super()`` (a classic pickle trap) still
    reaches the other side as a readable error instead of killing the reply.
    """
    try:
        import cloudpickle

        pickle.loads(cloudpickle.dumps(ex))
    except Exception:
        return UnpicklableRemoteError(_qualname(type(ex)), _safe_str(ex))
    return ex


def _safe_str(ex: BaseException) -> str:
    try:
        return str(ex)
    except Exception:
        return f"<unprintable {type(ex).__name__}>"


class RemoteException(DistexecError):
    """User code raised an exception in process ``pid``.

    Julia: ``RemoteException(pid, captured)``. The original exception is
    ``exc.captured.ex``, its remote traceback text ``exc.captured.tb_text``.
    """

    def __init__(self, pid: int, captured: CapturedException) -> None:
        super().__init__(pid, captured)
        self.pid = pid
        self.captured = captured

    def __str__(self) -> str:
        return (
            f"on worker {self.pid}: {self.captured.type_name}: {_safe_str(self.captured.ex)}\n"
            f"--- remote traceback ---\n{self.captured.tb_text}"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (RemoteException, (self.pid, self.captured))


class ProcessExitedException(DistexecError):
    """The process ``pid`` exited, or its connection dropped, while it was needed.

    Julia: ``ProcessExitedException(worker_id)``.
    """

    def __init__(self, message: str | int = "", *, pid: int = -1) -> None:
        if isinstance(message, int):
            pid, message = message, f"worker {message} has exited"
        super().__init__(message)
        self.pid = pid

    @property
    def worker_id(self) -> int:
        """Julia's field name for :attr:`pid`."""
        return self.pid

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(tp: type[BaseException], args: tuple[object, ...], state: dict[str, object]) -> object:
    ex = tp.__new__(tp)
    BaseException.__init__(ex, *args)
    ex.__dict__.update(state)
    return ex


class ClusterClosedError(DistexecError):
    """The process group, worker or executor was closed by this program."""


class ChannelClosedError(DistexecError):
    """``put`` on a closed channel, or ``take`` on a closed and empty one.

    Julia: ``InvalidStateException("Channel is closed.", :closed)``.
    """


class LaunchError(DistexecError):
    """A cluster manager failed to start a worker; ``host`` and ``stderr_tail`` say where, why."""

    def __init__(self, message: str, *, host: str = "", stderr_tail: str = "") -> None:
        super().__init__(message)
        self.host = host
        self.stderr_tail = stderr_tail

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class WorkerTimeoutError(LaunchError, TimeoutError):
    """A worker did not report its address, or did not join, within the worker timeout."""


class ProtocolError(DistexecError, ConnectionError):
    """The peer sent something that is not distexec's protocol."""


class AuthenticationError(ProtocolError):
    """The peer failed the cookie challenge."""


class VersionMismatchError(ProtocolError):
    """The two sides run incompatible versions; the message names both."""


class FrameTooLargeError(ProtocolError):
    """A frame announced more bytes than the configured cap."""


class SerializationError(DistexecError, pickle.PicklingError, TypeError):
    """An argument or a result could not be pickled; nothing was sent."""


class DeserializationError(DistexecError, pickle.UnpicklingError):
    """A value arrived but could not be unpickled in this process.

    ``type_name`` and ``tb_text`` describe the failure.
    """

    def __init__(self, message: str, *, type_name: str = "", tb_text: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.tb_text = tb_text

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class TaskTimeoutError(DistexecError, TimeoutError):
    """A call ran longer than its ``task_timeout`` (``timeout`` seconds) on worker ``pid``,
    which was killed for it (a thread cannot be stopped safely; a process can)."""

    def __init__(self, message: str = "", *, pid: int = -1, timeout: float | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.timeout = timeout

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class ClusterError(DistexecError, RuntimeError):
    """A misuse of the cluster that Julia reports with ``ErrorException``."""


_WORKER_LOST = ("WorkerDiedError", "WorkerLostError", "WorkerUnresponsiveError")


def __getattr__(name: str) -> Any:
    # PEP 562: the BrokenProcessPool errors load on first use (see the module docstring).
    # The import system runs _worker_lost once, even when threads race here.
    if name not in _WORKER_LOST:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import _worker_lost

    value = getattr(_worker_lost, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WORKER_LOST})

"""The cluster manager interface: how workers are started, told things, and stopped.

Layer: L3 (beside the cluster). Imports: stdlib, distexec.errors.

Julia: ``ClusterManager``, ``WorkerConfig``, ``launch``, ``manage``, ``kill``, ``connect``.
A manager only starts processes and says where they listen; the cluster does the rest.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any


@dataclass
class WorkerConfig:
    """What a manager knows about one worker it launched (Julia's ``WorkerConfig``).

    ``launch`` fills in what it knows (``io`` for a banner to read, or ``host``/``port``);
    ``connect`` and the cluster fill in the rest (``connect_at``, ``ospid``, ``environ``).
    """

    io: IO[bytes] | None = None
    host: str | None = None
    port: int | None = None
    count: int | str | None = None
    exename: str | None = None
    exeflags: tuple[str, ...] | None = None
    userdata: Any = None
    tunnel: bool | None = None
    multiplex: bool | None = None
    forward: str | None = None
    bind_addr: str | None = None
    sshflags: tuple[str, ...] | None = None
    max_parallel: int | None = None
    connect_at: Any = None
    process: Any = None
    ospid: int | None = None
    environ: dict[str, Any] | None = None
    ident: Any = None
    connect_idents: list[Any] | None = None
    enable_threaded_blas: bool | None = None
    #: Extra transport options a manager passes to the cluster (e.g. an AF_UNIX path).
    extra: dict[str, Any] = field(default_factory=dict)


class ClusterManager(abc.ABC):
    """Starts worker processes and reports how to reach them.

    Subclass it to run workers anywhere: implement :meth:`launch`, and optionally
    :meth:`manage`, :meth:`kill` and :meth:`connect`. ``addprocs(MyManager(...))`` does the rest.
    """

    #: Keyword arguments ``addprocs`` accepts for this manager, with their defaults.
    def default_params(self) -> dict[str, Any]:
        return {}

    @abc.abstractmethod
    def launch(
        self,
        params: Mapping[str, Any],
        launched: list[WorkerConfig],
        launch_ntfy: threading.Condition,
    ) -> None:
        """Start the workers; for each, append a :class:`WorkerConfig` to *launched* and
        ``notify_all`` *launch_ntfy* (holding it). Return once every worker was started.

        Julia: ``launch(manager, params, launched, launch_ntfy)``. Called on its own thread;
        an exception raised here surfaces from ``addprocs`` with its message.
        """

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:  # noqa: B027
        """Hear about a worker's life: ``op`` is ``"register"``, ``"deregister"``,
        ``"interrupt"`` or ``"finalize"``. Julia: ``manage(manager, id, config, op)``."""

    def kill(self, pid: int, config: WorkerConfig) -> None:  # noqa: B027
        """Make worker *pid* exit. Julia: ``kill(manager, pid, config)``.

        The cluster has already sent the worker an exit message when this runs, and it
        escalates to SIGTERM and SIGKILL on ``config.process`` afterwards if that is a
        local process; a manager whose workers live elsewhere stops them here.
        """

    def connect(self, pid: int, config: WorkerConfig) -> tuple[Any, Any]:
        """Return ``(instream, outstream)`` for a custom transport, or raise
        ``NotImplementedError`` to let the cluster connect over TCP to what the worker
        reported (the default). Julia: ``connect(manager, pid, config)``."""
        raise NotImplementedError

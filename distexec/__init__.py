"""distexec: Julia's ``Distributed`` for Python.

A master (pid 1) and numbered workers (2, 3, ...) that call each other's functions:
``remotecall``, ``Future``, ``RemoteChannel``, ``pmap``, ``WorkerPool``, cluster managers,
and ``DistributedExecutor``, a drop-in ``concurrent.futures`` executor.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _refstore as _refstore
from ._api import addprocs as addprocs
from ._api import cluster_cookie as cluster_cookie
from ._api import interrupt as interrupt
from ._api import myid as myid
from ._api import myrole as myrole
from ._api import nprocs as nprocs
from ._api import nworkers as nworkers
from ._api import procs as procs
from ._api import rmprocs as rmprocs
from ._api import statistics as statistics
from ._api import worker_id_from_socket as worker_id_from_socket
from ._api import workers as workers
from ._channel import Channel as Channel
from ._free import fetch as fetch
from ._free import isready as isready
from ._free import put as put
from ._free import take as take
from ._free import wait as wait
from ._ids import RRID as RRID
from ._remotecall import remote_do as remote_do
from ._remotecall import remotecall as remotecall
from ._remotecall import remotecall_fetch as remotecall_fetch
from ._remotecall import remotecall_wait as remotecall_wait
from ._version import __version__ as __version__
from .errors import AuthenticationError as AuthenticationError
from .errors import CapturedException as CapturedException
from .errors import ChannelClosedError as ChannelClosedError
from .errors import ClusterClosedError as ClusterClosedError
from .errors import ClusterError as ClusterError
from .errors import DeserializationError as DeserializationError
from .errors import DistexecError as DistexecError
from .errors import LaunchError as LaunchError
from .errors import ProcessExitedException as ProcessExitedException
from .errors import ProtocolError as ProtocolError
from .errors import RemoteException as RemoteException
from .errors import SerializationError as SerializationError
from .errors import TaskTimeoutError as TaskTimeoutError
from .errors import VersionMismatchError as VersionMismatchError
from .errors import WorkerTimeoutError as WorkerTimeoutError
from .managers.base import ClusterManager as ClusterManager
from .managers.base import WorkerConfig as WorkerConfig
from .managers.local import LocalManager as LocalManager
from .pmap import pmap as pmap
from .refs import Future as Future
from .refs import RemoteChannel as RemoteChannel
from .refs import channel_from_id as channel_from_id
from .refs import remoteref_id as remoteref_id
from .retry import ExponentialBackOff as ExponentialBackOff
from .retry import retry as retry
from .workerpool import AbstractWorkerPool as AbstractWorkerPool
from .workerpool import CachingPool as CachingPool
from .workerpool import WorkerPool as WorkerPool
from .workerpool import default_worker_pool as default_worker_pool
from .workerpool import remote as remote

if TYPE_CHECKING:
    from ._custom import init_worker as init_worker
    from ._custom import process_messages as process_messages
    from ._custom import start_worker as start_worker
    from ._macros import async_ as async_
    from ._macros import clear as clear
    from ._macros import distributed as distributed
    from ._macros import everywhere as everywhere
    from ._macros import fetchfrom as fetchfrom
    from ._macros import spawn as spawn
    from ._macros import spawnat as spawnat
    from ._macros import sync as sync
    from ._macros import timedwait as timedwait
    from ._transport.tls import TLSConfig as TLSConfig
    from .errors import WorkerDiedError as WorkerDiedError
    from .errors import WorkerLostError as WorkerLostError
    from .errors import WorkerUnresponsiveError as WorkerUnresponsiveError
    from .executor import DistributedExecutor as DistributedExecutor
    from .managers.elastic import ElasticManager as ElasticManager
    from .managers.ssh import SSHManager as SSHManager

# pmap and retry stay above: each shares its name with its module, which an import of the
# module would otherwise put in the function's place.
# Loaded on first use: a worker (and a script that only calls remotecall) never pays for the
# executor, pmap, the macros, SSH or TLS (PEP 562). The core above wires the runtime: the
# reference store, pools' membership hooks and heartbeats must be in place before the first
# message arrives. The BrokenProcessPool errors come from distexec.errors on first use too
# (their base class costs an import of multiprocessing).
_LAZY: dict[str, str] = {
    "init_worker": "._custom",
    "process_messages": "._custom",
    "start_worker": "._custom",
    "async_": "._macros",
    "clear": "._macros",
    "distributed": "._macros",
    "everywhere": "._macros",
    "fetchfrom": "._macros",
    "spawn": "._macros",
    "spawnat": "._macros",
    "sync": "._macros",
    "timedwait": "._macros",
    "TLSConfig": "._transport.tls",
    "WorkerDiedError": ".errors",
    "WorkerLostError": ".errors",
    "WorkerUnresponsiveError": ".errors",
    "DistributedExecutor": ".executor",
    "ElasticManager": ".managers.elastic",
    "SSHManager": ".managers.ssh",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'distexec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "AbstractWorkerPool",
    "AuthenticationError",
    "CachingPool",
    "CapturedException",
    "Channel",
    "ChannelClosedError",
    "ClusterClosedError",
    "ClusterError",
    "ClusterManager",
    "DeserializationError",
    "DistexecError",
    "DistributedExecutor",
    "ElasticManager",
    "ExponentialBackOff",
    "Future",
    "LaunchError",
    "LocalManager",
    "ProcessExitedException",
    "ProtocolError",
    "RRID",
    "RemoteChannel",
    "RemoteException",
    "SSHManager",
    "SerializationError",
    "TLSConfig",
    "TaskTimeoutError",
    "VersionMismatchError",
    "WorkerConfig",
    "WorkerDiedError",
    "WorkerLostError",
    "WorkerPool",
    "WorkerTimeoutError",
    "WorkerUnresponsiveError",
    "__version__",
    "addprocs",
    "async_",
    "channel_from_id",
    "clear",
    "cluster_cookie",
    "default_worker_pool",
    "distributed",
    "everywhere",
    "fetch",
    "fetchfrom",
    "init_worker",
    "interrupt",
    "isready",
    "myid",
    "myrole",
    "nprocs",
    "nworkers",
    "pmap",
    "process_messages",
    "procs",
    "put",
    "remote",
    "remote_do",
    "remotecall",
    "remotecall_fetch",
    "remotecall_wait",
    "remoteref_id",
    "retry",
    "rmprocs",
    "spawn",
    "spawnat",
    "start_worker",
    "statistics",
    "sync",
    "take",
    "timedwait",
    "wait",
    "worker_id_from_socket",
    "workers",
]

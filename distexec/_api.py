"""Julia-style free functions on this process's group: addprocs, rmprocs, procs, myid, ...

Layer: L6 runtime/API. Imports: everything below.

``subprocess`` is imported in the functions that look at a worker's process (pid 1's
business): every worker imports this module, and none needs it.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import os
import shutil
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from . import _cluster, _config, refs
from ._cluster import TOPOLOGIES, GroupStatistics, PeerState
from ._ids import MASTER, WorkerId
from .errors import ClusterError, LaunchError, ProtocolError, WorkerTimeoutError
from .managers import local as _local
from .managers.base import ClusterManager, WorkerConfig

#: One addprocs/rmprocs at a time (Julia's ``worker_lock``).
_worker_lock = threading.RLock()

_COMMON_PARAMS: dict[str, Any] = {
    "topology": "all_to_all",
    "dir": None,
    "exename": None,
    "exeflags": (),
    "env": None,
    "enable_threaded_blas": False,
    "lazy": True,
    "timeout": None,
    "tls": None,
    "allow_insecure_network": False,
}


def _group() -> _cluster.ProcessGroup:
    refs.store()  # make sure the owner side is wired before any message can arrive
    return _cluster.group()


def myid() -> WorkerId:
    """This process's id: 1 on the master, 2, 3, ... on workers. Julia: ``myid()``."""
    return _cluster.group().myid


def myrole() -> str:
    """``"master"`` or ``"worker"``. Julia: ``Distributed.myrole()``."""
    return _cluster.group().role


def procs(pid: WorkerId | None = None) -> list[WorkerId]:
    """All process ids, pid 1 included (Julia: ``procs()``); with *pid*, the processes on the
    same host as *pid* (Julia: ``procs(pid)``)."""
    g = _cluster.group()
    if pid is None:
        return g.procs()
    if g.myid != MASTER:
        pids: list[WorkerId] = g.call_fetch(MASTER, _sys_procs_on_host, (pid,), {})  # type: ignore[assignment]
        return pids
    return _procs_on_host(pid)


def _host_of(pid: WorkerId) -> str:
    g = _cluster.group()
    if pid == g.myid:
        return "local"
    peer = g.peer(pid)
    if peer is None:
        raise ValueError(f"no process with id {pid}")
    if isinstance(peer.manager, _local.LocalManager):
        return "local"
    addr = peer.address
    return str(addr[0]) if isinstance(addr, tuple) else str(addr)


def _procs_on_host(pid: WorkerId) -> list[WorkerId]:
    g = _cluster.group()
    g.check_pid(pid)
    host = _host_of(pid)
    return sorted(p for p in g.procs() if _host_of(p) == host)


def _sys_procs_on_host(pid: WorkerId) -> list[WorkerId]:
    return _procs_on_host(pid)


_sys_procs_on_host.distexec_system = True  # type: ignore[attr-defined]


def workers() -> list[WorkerId]:
    """Worker ids; ``[1]`` when there are none (Julia: ``workers()``)."""
    return _cluster.group().worker_ids()


def nprocs() -> int:
    """The number of processes, pid 1 included (Julia: ``nprocs()``)."""
    return len(_cluster.group().procs())


def nworkers() -> int:
    """The number of workers; 1 when there are none, as in Julia (``nworkers()``)."""
    n = nprocs()
    return 1 if n == 1 else n - 1


def worker_id_from_socket(s: Any) -> WorkerId:
    """The pid of the process at the other end of *s* (a socket or a connection), ``myid()``
    for ``None`` (a local buffer), and -1 if *s* is not one of this process's links.

    Julia: ``worker_id_from_socket(s)``, for custom serializers that need to know where an
    object is going.
    """
    g = _cluster.group()
    if s is None:
        return g.myid
    for peer in g.peers():
        conn = peer.conn
        if conn is not None and (conn is s or conn.sock is s):
            return peer.pid
    return -1


def cluster_cookie(cookie: str | None = None) -> str:
    """Return the cluster cookie, or set it (before any worker exists) and return it.

    Julia: ``cluster_cookie()``, ``cluster_cookie(c)``. The cookie authenticates every
    connection; it travels on a worker's stdin, never on a command line.
    """
    g = _cluster.group()
    if cookie is not None:
        if not isinstance(cookie, str):
            raise TypeError("the cookie must be a str")
        if not cookie.isascii() or "\n" in cookie:
            raise ValueError("the cookie must be ASCII text on one line")
        g.set_cookie(cookie)
    return g.cookie().decode()


def statistics() -> GroupStatistics:
    """A frozen snapshot of this process's view: refs it owns, handles it holds, workers."""
    refs.store()
    return _cluster.group().statistics()


# ---------------------------------------------------------------------------- addprocs


def _require_master(what: str) -> _cluster.ProcessGroup:
    g = _group()
    if g.myid != MASTER:
        raise ClusterError("Only process 1 can add and remove workers")
    return g


def addprocs(
    arg: int | ClusterManager | Sequence[Any] | None = None,
    /,
    *,
    restrict: bool = True,
    **kwargs: Any,
) -> list[WorkerId]:
    """Start workers and add them to the group; return their new pids, sorted.

    Julia: ``addprocs(np; restrict=true, kw...)``, ``addprocs(; kw...)`` (one per usable CPU),
    ``addprocs(machines; ...)`` and ``addprocs(manager; kw...)``.

    Keywords: ``topology`` (``"all_to_all"``, ``"master_worker"``, ``"custom"``), ``lazy``,
    ``dir``, ``exename``, ``exeflags``, ``env``, ``enable_threaded_blas``, ``timeout``
    (seconds to wait for each worker; default ``DISTEXEC_WORKER_TIMEOUT``), ``tls`` (a
    ``TLSConfig``: every link runs mutual TLS 1.3, the cookie handshake inside it) and
    ``allow_insecure_network`` (let workers listen on a non-loopback address without TLS).

    Raises:
        ClusterError: called on a worker, or a topology/lazy change while workers exist.
        LaunchError: the manager failed (its message is kept); workers that did start stay.
    """
    g = _require_master("add")
    if arg is None:
        from loky import cpu_count

        manager: ClusterManager = _local.LocalManager(int(cpu_count()), restrict)
    elif isinstance(arg, ClusterManager):
        manager = arg
    elif isinstance(arg, bool):
        raise TypeError("addprocs takes a number of workers, a list of machines or a manager")
    elif isinstance(arg, int):
        manager = _local.LocalManager(arg, restrict)
    elif isinstance(arg, Sequence) and not isinstance(arg, (str, bytes)):
        from .managers import ssh

        manager = ssh.SSHManager(arg)
    else:
        raise TypeError(
            "addprocs takes a number of workers, a list of machines or a ClusterManager, "
            f"not {type(arg).__name__}"
        )
    params = _check_params(manager, kwargs)
    with _worker_lock:
        _set_topology(g, str(params["topology"]), bool(params["lazy"]))
        new = _launch_and_connect(g, manager, params)
    return new


def add_private_workers(n: int, **kwargs: Any) -> list[WorkerId]:
    """Start *n* local workers that belong to their caller (an executor), not to the
    default pool. They are members of the group like any other."""
    g = _require_master("add")
    manager = _local.LocalManager(n, True)
    params = _check_params(manager, kwargs)
    params["private"] = True
    with _worker_lock:
        if not any(p.state is not PeerState.TERMINATED for p in g.peers()):
            _set_topology(g, str(params["topology"]), bool(params["lazy"]))
        return _launch_and_connect(g, manager, params)


def _check_params(manager: ClusterManager, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    params = dict(_COMMON_PARAMS)
    params.update(manager.default_params())
    for k in kwargs:
        if k not in params:
            raise ValueError(f"Invalid keyword argument {k}")
    params.update(kwargs)
    if params["topology"] not in TOPOLOGIES:
        raise ValueError(
            f"topology must be one of {', '.join(map(repr, TOPOLOGIES))}, "
            f"not {params['topology']!r}"
        )
    if params["topology"] != "all_to_all":
        params["lazy"] = False
    _check_network(manager, params)
    return params


def _check_network(manager: ClusterManager, params: dict[str, Any]) -> None:
    """``tls=`` and ``allow_insecure_network=``: pick the cluster's TLS, hand its file paths
    to the workers (environment), and refuse a plain non-loopback listener unless allowed.

    The cluster's links are all TLS or all plain: ``tls=None`` keeps what live workers use;
    another ``TLSConfig`` while workers exist is a ``ClusterError``.
    """
    tls = params["tls"]
    if tls is not None:
        from ._transport.tls import TLSConfig  # here: it imports ssl, which plain links skip

        if not isinstance(tls, TLSConfig):
            raise TypeError(f"tls must be a TLSConfig, not {type(tls).__name__}")
    allow = params["allow_insecure_network"]
    if not isinstance(allow, bool):
        raise TypeError(f"allow_insecure_network must be True or False, not {allow!r}")
    g = _cluster.group()
    live = any(p.state is not PeerState.TERMINATED for p in g.peers())
    if tls is None and live:
        tls = g.tls
    elif live and tls != g.tls:
        raise ClusterError(
            "the cluster's links are "
            + ("plain" if g.tls is None else "TLS with another TLSConfig")
            + ": workers added now must match (remove the others first)"
        )
    params["tls"] = tls
    if tls is not None:
        tls.client_context()  # the files load here, or a clear error before anything starts
        env = dict(params["env"] or {})
        env.update(tls.to_env())
        params["env"] = env
        g.set_tls(tls)
        return
    if not live:
        g.set_tls(None)
    if allow:
        env = dict(params["env"] or {})
        env["DISTEXEC_ALLOW_INSECURE_NETWORK"] = "1"
        params["env"] = env
        return
    insecure = _insecure_binds(manager, params)
    if not insecure:
        return
    advice = (
        "pass tls=TLSConfig(...) to encrypt and authenticate the links, or "
        "allow_insecure_network=True to accept cookie-authenticated plain TCP"
    )
    if isinstance(manager, _local.LocalManager):
        raise ValueError(f"workers would listen on {insecure[0]} without TLS: {advice}")
    import warnings

    warnings.warn(
        f"{type(manager).__name__}: workers will listen on {', '.join(insecure)} without "
        f"TLS (plain TCP, authenticated by the cookie only); {advice}",
        UserWarning,
        stacklevel=4,
    )


def _insecure_binds(manager: ClusterManager, params: Mapping[str, Any]) -> list[str]:
    """The non-loopback addresses *manager*'s workers would listen on (what is known here)."""
    import ipaddress

    def loopback(host: str) -> bool:
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host == "localhost"

    if isinstance(manager, _local.LocalManager):
        return [] if manager.restrict else [str(params.get("bind_addr") or "0.0.0.0")]
    from .managers.ssh import SSHManager

    if isinstance(manager, SSHManager) and not params.get("tunnel"):
        out = []
        for m in manager.machines:
            host = m.bind_addr or m.host
            if not loopback(host) and host not in out:
                out.append(host)
        return out
    return []


def _set_topology(g: _cluster.ProcessGroup, topology: str, lazy: bool) -> None:
    live = [p for p in g.peers() if p.state is not PeerState.TERMINATED]
    if live and topology != g.topology:
        raise ClusterError(
            f"Workers with Topology {g.topology} already exist. "
            f"Requested Topology {topology} cannot be set."
        )
    if live and g.topology == "all_to_all" and lazy != g.lazy:
        raise ClusterError(f"Active workers with lazy={g.lazy}. Cannot set lazy={lazy}")
    g.topology = topology
    g.lazy = lazy


def _launch_and_connect(
    g: _cluster.ProcessGroup, manager: ClusterManager, params: dict[str, Any]
) -> list[WorkerId]:
    timeout = (
        float(params["timeout"]) if params["timeout"] is not None else _config.worker_timeout()
    )
    params["cookie"] = g.cookie()
    params["timeout"] = timeout
    launched: list[WorkerConfig] = []
    ntfy = threading.Condition()
    launch_error: list[BaseException] = []
    launch_done = threading.Event()

    def run_launch() -> None:
        try:
            manager.launch(params, launched, ntfy)
        except BaseException as exc:
            launch_error.append(exc)
        finally:
            launch_done.set()
            with ntfy:
                ntfy.notify_all()

    threading.Thread(target=run_launch, name="distexec-launch", daemon=True).start()
    pool = cf.ThreadPoolExecutor(max_workers=64, thread_name_prefix="distexec-setup")
    setups: list[tuple[WorkerId, cf.Future[WorkerId]]] = []
    try:
        while True:
            with ntfy:
                while not launched and not launch_done.is_set():
                    ntfy.wait(1.0)
                batch, launched[:] = list(launched), []
            for config in batch:
                pid = g.new_pid()
                setups.append(
                    (
                        pid,
                        pool.submit(
                            _setup_worker,
                            g,
                            pid,
                            config,
                            manager,
                            timeout,
                            bool(params.get("private")),
                        ),
                    )
                )
            if launch_done.is_set():
                with ntfy:
                    if not launched:
                        break
        errors: list[BaseException] = []
        new: list[WorkerId] = []
        for _, fut in setups:
            try:
                new.append(fut.result())
            except BaseException as exc:
                errors.append(exc)
    finally:
        pool.shutdown(wait=True)
    if new:
        g.push_membership()
        _ensure_atexit()
    if launch_error:
        failure = launch_error[0]
        if isinstance(failure, LaunchError):
            raise failure
        raise LaunchError(f"{type(manager).__name__}.launch failed: {failure}") from failure
    if errors:
        if len(errors) == 1:
            raise errors[0]
        raise ExceptionGroup(f"{len(errors)} of {len(setups)} workers failed to start", errors)  # type: ignore[type-var]
    return sorted(new)


def _setup_worker(
    g: _cluster.ProcessGroup,
    pid: WorkerId,
    config: WorkerConfig,
    manager: ClusterManager,
    timeout: float,
    private: bool = False,
) -> WorkerId:
    import subprocess

    deadline = time.monotonic() + timeout
    relay: _local.OutputRelay | None = None
    try:
        try:
            streams = manager.connect(pid, config)
        except NotImplementedError:
            streams = None
        if streams is not None:
            # A custom transport (Julia: connect returns (instream, outstream)): pid 1
            # authenticates over the streams as it would over a socket, then joins as usual.
            from . import _custom

            conn = _custom.master_link(
                g, pid, config, streams, max(0.1, deadline - time.monotonic())
            )
            relay = _start_relay(pid, config) if config.io is None else None
            peer = g.connect_worker(
                pid,
                config.connect_at,
                config,
                manager,
                timeout=max(0.1, deadline - time.monotonic()),
                conn=conn,
                private=private,
            )
        else:
            extras: dict[str, str] = {}
            if config.io is not None:
                try:
                    host, port, extras = _local.read_banner(
                        config.io, deadline, lambda line: print(f"From worker {pid}: {line}")
                    )
                except LaunchError as exc:
                    if isinstance(config.process, subprocess.Popen):
                        try:
                            config.process.wait(1.0)  # let it finish dying: its stderr is complete
                        except subprocess.TimeoutExpired:
                            pass
                    raise type(exc)(
                        f"worker {pid}: {exc}{_tail(config)}",
                        host=str(config.host or exc.host or ""),
                        stderr_tail=_tail(config),
                    ) from exc
                host = config.bind_addr or host
            elif config.host is not None and config.port is not None:
                host, port = config.host, config.port
            else:
                raise LaunchError(
                    f"{type(manager).__name__} gave worker {pid} neither io nor host/port"
                )
            relay = _start_relay(pid, config, private)
            address: Any = (host, port)
            if "unix" in extras and isinstance(manager, _local.LocalManager):
                # Same machine: AF_UNIX moves large buffers several times faster than TCP.
                address = extras["unix"]
                config.extra["unix_dir"] = os.path.dirname(address)
            config.connect_at = address
            peer = g.connect_worker(
                pid,
                address,
                config,
                manager,
                timeout=max(0.1, deadline - time.monotonic()),
                private=private,
            )
        if relay is not None:
            peer.output_tail = relay.tail
        try:
            manager.manage(pid, config, "register")
        except Exception as exc:
            _cluster._log(f"{type(manager).__name__}.manage(register) failed: {exc}")
        return pid
    except BaseException as exc:
        _kill_failed(pid, config, manager)
        if isinstance(exc, (LaunchError, ClusterError, ProtocolError)):
            raise  # ProtocolError: a failed TLS or cookie check, another version: said as is
        if isinstance(exc, TimeoutError):
            raise WorkerTimeoutError(
                f"worker {pid} did not connect within {timeout:g} seconds{_tail(config)}",
                host=str(config.host or ""),
                stderr_tail=_tail(config),
            ) from exc
        raise LaunchError(
            f"worker {pid} could not be set up: {type(exc).__name__}: {exc}{_tail(config)}",
            host=str(config.host or ""),
        ) from exc


def _start_relay(
    pid: WorkerId, config: WorkerConfig, private: bool = False
) -> _local.OutputRelay | None:
    import subprocess
    import sys

    proc = config.process
    streams = []
    if config.io is not None:
        streams.append((config.io, sys.stdout))
    if isinstance(proc, subprocess.Popen) and proc.stderr is not None:
        streams.append((proc.stderr, sys.stderr))
    if not streams:
        return None
    # An executor's own workers print as ProcessPoolExecutor's do: straight through.
    relay = _local.OutputRelay(pid, streams, "" if private else None)
    config.extra["relay"] = relay
    return relay


def _tail(config: WorkerConfig) -> str:
    import subprocess

    proc = config.process
    if (
        isinstance(proc, subprocess.Popen)
        and proc.stderr is not None
        and "relay" not in config.extra
    ):
        try:
            if proc.poll() is not None:
                data = proc.stderr.read() or b""
                text = data.decode(errors="replace").strip()
                if text:
                    return "; its stderr ended with:\n" + "\n".join(text.splitlines()[-15:])
        except (OSError, ValueError):
            pass
    return ""


def _kill_failed(pid: WorkerId, config: WorkerConfig, manager: ClusterManager) -> None:
    import subprocess

    g = _cluster.group()
    g.forget(pid, "failed to start")
    try:
        manager.kill(pid, config)
    except Exception:
        pass
    proc = config.process
    if isinstance(proc, subprocess.Popen):
        _local.stop_process(proc, grace=0.0, term_grace=1.0)


def _remove_unix_dir(config: WorkerConfig | None) -> None:
    """A killed worker cannot remove its socket directory; its master does."""
    unix_dir = config.extra.get("unix_dir") if config is not None else None
    if unix_dir:
        shutil.rmtree(unix_dir, ignore_errors=True)


def _describe_exit(peer: _cluster.Peer) -> str:
    """Why a worker's link dropped, from its process: an ``ExitReason`` with the exit code or
    signal and the last stderr lines (a crash's faulthandler report among them), added to
    the cause that whoever killed it recorded first (heartbeat, task timeout, cancel)."""
    import subprocess

    cause = peer.exit_reason if isinstance(peer.exit_reason, _cluster.ExitReason) else None
    config = peer.config
    proc = config.process if config is not None else None
    if peer.closing or not isinstance(proc, subprocess.Popen):
        return cause or peer.exit_reason
    code, text = _local.exit_description(proc, wait=0.5)
    if code is not None:
        _remove_unix_dir(config)
    lines: list[str] = []
    relay = config.extra.get("relay") if config is not None else None
    if code is not None and relay is not None:
        relay.done.wait(0.5)
        lines = [line for line in relay.tail if line.strip()]
    if cause is not None:
        text = f"{cause}; {text}"
    elif code == -9:  # SIGKILL, and distexec did not send it
        text += " (not by distexec: by another process, or by the kernel when memory ran out)"
    shown = _crash_lines(lines)
    if shown:
        text += "; its stderr ended with:\n  " + "\n  ".join(shown)
    return _cluster.ExitReason(
        text,
        kind=cause.kind if cause is not None else ("exited" if code is not None else "link"),
        exitcode=code,
        stderr_tail="\n".join(lines),
        call_errors=cause.call_errors if cause is not None else None,
        ref_errors=cause.ref_errors if cause is not None else None,
    )


def _crash_lines(lines: list[str], limit: int = 12) -> list[str]:
    """The stderr lines worth quoting: a faulthandler report from its first line, else the end."""
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Fatal Python error"):
            return lines[i : i + limit]
    return lines[-10:]


_cluster.set_exit_reason_hook(_describe_exit)


# ---------------------------------------------------------------------------- rmprocs


def rmprocs(
    *pids: WorkerId | Iterable[WorkerId], waitfor: float | None = None
) -> cf.Future[None] | None:
    """Remove workers: ask each to exit, then SIGTERM, then SIGKILL; leave no zombie.

    Julia: ``rmprocs(pids...; waitfor=typemax(Int))``. ``waitfor=None`` waits until they are
    gone; ``waitfor=0`` returns at once with a ``concurrent.futures.Future`` to wait on;
    another number waits that long and raises ``ClusterError`` if any is still running.
    Calls still waiting on a removed worker fail with ``ClusterClosedError``.
    """
    g = _require_master("remove")
    flat: list[WorkerId] = []
    for p in pids:
        if isinstance(p, int):
            flat.append(p)
        else:
            flat.extend(p)
    targets = []
    for pid in flat:
        if pid == MASTER:
            _cluster._log("rmprocs: process 1 not removed")
            continue
        g.check_pid(pid) if g.peer(pid) is None else None
        targets.append(pid)

    done: cf.Future[None] = cf.Future()

    def remove_all() -> None:
        try:
            with _worker_lock:
                threads = [
                    threading.Thread(target=_remove_one, args=(g, pid), daemon=True)
                    for pid in targets
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                g.push_membership(removed=targets)
            done.set_result(None)
        except BaseException as exc:  # pragma: no cover
            done.set_exception(exc)

    if waitfor == 0:
        threading.Thread(target=remove_all, name="distexec-rmprocs", daemon=True).start()
        return done
    if waitfor is None:
        remove_all()
        done.result()
        quiesce()
        return None
    threading.Thread(target=remove_all, name="distexec-rmprocs", daemon=True).start()
    try:
        done.result(timeout=waitfor)
    except cf.TimeoutError:
        raise ClusterError(
            f"rmprocs: pids {targets} not terminated after {waitfor} seconds."
        ) from None
    return None


def quiesce(timeout: float = 1.0) -> bool:
    """Once the last worker is gone, end distexec's threads in this process now and wait up
    to *timeout* seconds for them (idle call threads, the watchdog, heartbeats, the spawner,
    finished output relays); True if none is left. What ``ProcessPoolExecutor.shutdown
    (wait=True)`` does for its threads; a no-op while any worker is connected."""
    g = _cluster.group()
    if g.role != "master" or g.has_links():
        return False
    deadline = time.monotonic() + timeout
    from . import _heartbeat

    _heartbeat.quiesce(timeout)
    _local.quiesce(max(deadline - time.monotonic(), 0.0))
    return g.quiesce(max(deadline - time.monotonic(), 0.0))


def _remove_one(g: _cluster.ProcessGroup, pid: WorkerId) -> None:
    import subprocess

    peer = g.peer(pid)
    if peer is None:
        return
    peer.closing = True
    peer.exit_reason = peer.exit_reason or "removed by rmprocs"
    g.send_exit(pid)
    config, manager = peer.config, peer.manager
    if manager is not None and config is not None:
        try:
            manager.kill(pid, config)
        except Exception as exc:
            _cluster._log(f"{type(manager).__name__}.kill({pid}) failed: {exc}")
    proc = config.process if config is not None else None
    if isinstance(proc, subprocess.Popen):
        _local.stop_process(proc)
    g.forget(pid, "removed by rmprocs")
    _remove_unix_dir(config)
    relay = config.extra.get("relay") if config is not None else None
    if relay is not None:
        relay.done.wait(1.0)
    if manager is not None and config is not None:
        for op in ("deregister", "finalize"):
            try:
                manager.manage(pid, config, op)
            except Exception:
                pass


def _rmprocs_all_at_exit() -> None:
    g = _cluster.group()
    if g.myid != MASTER:
        return
    live = [p.pid for p in g.peers() if p.state is not PeerState.TERMINATED]
    if live:
        try:
            rmprocs(live, waitfor=10)
        except Exception:
            pass


_atexit_done = False


def _ensure_atexit() -> None:
    global _atexit_done
    if not _atexit_done:
        _atexit_done = True
        atexit.register(_rmprocs_all_at_exit)


# ---------------------------------------------------------------------------- interrupt


def interrupt(*pids: WorkerId | Iterable[WorkerId]) -> None:
    """Raise ``KeyboardInterrupt`` in the calls running on *pids* (default: all workers).

    Julia: ``interrupt(pids...)``. Only calls in flight are hit; the worker lives on, and an
    idle worker is untouched. The interrupted call's Future fails with a ``RemoteException``
    wrapping the ``KeyboardInterrupt``.
    """
    from ._interrupt import _sys_interrupt

    g = _require_master("interrupt")
    flat: list[WorkerId] = []
    for p in pids:
        flat.extend([p] if isinstance(p, int) else p)
    if not flat:
        flat = [p for p in g.procs() if p != MASTER]
    for pid in flat:
        if pid == g.myid:
            raise ValueError(
                f"interrupt: pid {pid} is this process; it interrupts workers only "
                "(here, a KeyboardInterrupt is Ctrl-C)"
            )
        g.check_pid(pid)
    for pid in flat:
        peer = g.peer(pid)
        g.call_do(pid, _sys_interrupt, (), {})
        if peer is not None and peer.manager is not None and peer.config is not None:
            try:
                peer.manager.manage(pid, peer.config, "interrupt")
            except Exception:
                pass

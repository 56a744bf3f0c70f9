"""SSHManager: workers on other machines, each started by an ``ssh`` session of its own.

Layer: L3 managers. Imports: stdlib, distexec._machinefile, distexec.errors, .base, .local.

Julia: ``SSHManager``, what ``addprocs(["host", ("user@host:22", 2), ("host", "auto")])`` uses.

How a worker starts
    One ``ssh`` session per worker (Julia starts one per host and has the first worker
    spawn the others; one per worker keeps every worker's lifetime tied to a session of its
    own). With ``multiplex=True`` the sessions to one machine share one connection (see
    "Multiplexing"): one login per machine, not one per worker. Sessions to
    one machine start at most ``max_parallel`` at a time (sshd drops unauthenticated
    connections beyond ``MaxStartups``, 10 by default); a slot is held until the worker has
    printed something, i.e. its session runs. The command is::

        ssh -T -a -x -o BatchMode=yes [-o ControlMaster=no -o ControlPath=SOCKET] \\
            -o ClearAllForwardings=yes [sshflags] [-p port] \\
            -- [user@]host "exec sh -c 'cd -- DIR && export K=V ... && \\
            exec PYTHON EXEFLAGS -m distexec.worker --bind ADDR [--port P] [...]'"

    ssh keeps the first value it is given for an option, so ``sshflags`` (and the user's ssh
    config) cannot turn batch mode off (nothing may prompt), add forwardings to a worker's
    session, nor point it at another control socket. The remote login shell only has to
    understand ``exec sh -c '...'`` (bash, zsh, csh and fish all do); the rest is POSIX
    ``sh``. The remote environment is sshd's, not ours: ``env=`` is exported in the command
    (servers usually accept only ``LANG LC_*`` through ``SetEnv``), together with
    ``PYTHONUNBUFFERED=1``, one BLAS thread unless ``enable_threaded_blas``, and
    ``DISTEXEC_WORKER_TIMEOUT`` if it is set here.

The cookie
    goes to ssh's stdin followed by a newline, never on a command line. stdin then stays
    open: without a terminal the remote worker gets no SIGHUP when the session dies, but it
    sees EOF on stdin and exits. So the session is the worker's lifeline: closing it (``kill``
    closes ssh's stdin), killing the local ssh, or this process dying makes the worker exit.
    A multiplexed session hands its stdin to the master; when its ssh dies, the master
    closes that session's channel, and only that worker sees EOF.

Multiplexing (``multiplex=True``; off by default, as in Julia)
    Worth it where logins are slow or limited (``MaxStartups``) and the login shell is
    cheap: the master's lifeline runs one more login shell per machine, so where that shell
    is slow (a ``.bashrc`` running ``pyenv init``: 170 ms on our CI machines) it costs more
    than the logins it saves. Each machine gets a master connection of ours, started before
    its first worker::

        ssh -T -a -x -o BatchMode=yes -o ControlMaster=yes -o ControlPath=SOCKET \\
            -o ControlPersist=no -o ClearAllForwardings=yes [sshflags] [-p port] \\
            -- [user@]host "exec sh -c 'exec cat >/dev/null'"

    It is ready once ``SOCKET`` exists (ssh links it into place after logging in); if it
    ends or times out before, each of the machine's workers fails with its ssh stderr, as a
    session of its own would. ``SOCKET`` is ``c`` in a directory of its own, made by us
    with mode 0700 in the temporary directory (``/tmp`` if that path is too long for a
    unix socket, ~104 bytes), named ``dxssh-<our pid>-*``; it is removed when the master
    ends, and directories of dead processes are swept when a master starts. The master's
    own session, a remote ``cat`` of a pipe from us, is its lifeline: we close the pipe
    when the launch is over, and ssh then ends the master when its last session ends (a
    master never outlives its workers; this process dying closes the pipe too). A thread
    reads the master's stderr, reaps it and removes the directory; ``rmprocs`` of a
    machine's last worker waits (2 s at most) until that is done, and an exit hook ends
    by pid whatever master is left. The ``count="auto"`` question and ``tunnel=True``
    forwards (``ssh -O forward``; ``-O cancel`` when the worker goes) use the master too.
    sshd allows 10 sessions per connection by default (``MaxSessions``; the lifeline holds
    one), so a machine gets one master per 9 workers; should a server allow fewer, ssh
    opens a connection of its own for each session refused (it says so on stderr).
    ``multiplex=False`` (the default): every session logs in by itself.

Which address a worker listens on
    ``bind_addr`` from the spec if given; else the host if it is an IP address; else the
    address ssh reached the host at, taken remotely from ``$SSH_CONNECTION`` (so an ssh alias
    or a name that resolves to 127.0.1.1 over there still gives a reachable address). The
    worker reports that address and the master (and the other workers) dial it. Until TLS
    exists, a worker listening on a non-loopback address gets ``--allow-insecure-network``:
    the link is cookie-authenticated but not encrypted. Use ``tunnel=True`` to avoid that.

``tunnel=True``
    The worker listens on the remote host's 127.0.0.1 (or the spec's ``bind_addr``). Once it
    reports its port, the master connection is asked to forward
    ``127.0.0.1:LPORT:127.0.0.1:PORT`` (``ssh -O forward``); without one, a second ssh runs
    ``-L`` (with ``ExitOnForwardFailure``) and a remote ``cat`` that exits when this process
    goes away. ``LPORT`` is the worker's own port number when that is free here, so the
    address the master dials is also valid on the worker's host, and workers on one host
    reach each other. The banner the cluster reads is rewritten to ``127.0.0.1:LPORT`` by a thread
    that then copies the worker's output on, and closes the tunnel when the worker ends.
    Workers on *different* hosts cannot reach each other in tunnel mode (each listens on
    its own loopback): use ``topology="master_worker"`` there.

Failures
    A session that ends before its worker is ready (login refused, port closed, no such
    Python) or stays silent past the timeout is reported with the tail of what ssh and the
    worker printed. ``launch`` starts every other worker anyway, and raises one
    ``LaunchError`` naming all the failed ones at the end; the cluster keeps the good ones.

Interrupts
    ``interrupt(pid)`` sends the worker a message that raises ``KeyboardInterrupt`` in its
    running calls; that suffices, so ``manage(..., "interrupt")`` does nothing (Julia's
    ``ssh host kill -2 PID`` would interrupt twice).

POSIX only (the master reads pipes with ``select``).
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import functools
import ipaddress
import os
import re
import selectors
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from .._machinefile import Machine, merge_machines
from ..errors import LaunchError, WorkerTimeoutError
from .base import ClusterManager, WorkerConfig
from .local import BANNER, _parse_banner, stop_process

__all__ = ["SSHManager"]

#: The remote interpreter when ``exename`` is not given.
DEFAULT_PYTHON = "python3"

_TUNNEL_READY = "distexec-tunnel-ready"
#: Sessions per master connection: sshd allows 10 per connection by default (MaxSessions),
#: and the master's own session (its lifeline) holds one while the launch runs.
_SESSIONS_PER_MASTER = 9
#: The control socket's name, in a private directory of its own.
_CONTROL_NAME = "c"
_SETTLE_TIMEOUT = 2.0  # seconds rmprocs of a machine's last worker waits for its master to end
_CONTROL_DIR_PREFIX = "dxssh-"
_SUN_PATH_MAX = 104  # sockaddr_un.sun_path on macOS and the BSDs (Linux: 108), NUL included
_SSH_BIND_SUFFIX = 17  # ssh binds "<ControlPath>.<16 random characters>", then links it
_SAFE_PATH = re.compile(r"[A-Za-z0-9/._+-]+\Z")  # nothing ssh would expand, split or quote
_TUNNEL_TRIES = 5
_STDERR_KEEP = 1 << 16  # bytes of early ssh stderr kept for error messages
_TAIL_LINES = 15
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_BIND_FAILED = re.compile(
    r"Address already in use|cannot listen|local forwarding|Port forwarding failed", re.I
)

# Printed by `ssh host python -c ...` for count="auto": usable CPUs (cgroup aware via loky).
_CPU_COUNT_SCRIPT = """\
try:
    from loky import cpu_count
    n = cpu_count()
except ImportError:
    import os
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
print("distexec-cpus", n or 1)
"""


# ---------------------------------------------------------------------------- options


@dataclass(frozen=True, slots=True)
class _Options:
    """Everything ``launch`` needs from ``addprocs``'s keywords, checked once."""

    tunnel: bool
    multiplex: bool
    sshflags: tuple[str, ...]
    max_parallel: int
    ssh: str
    exename: str
    exeflags: tuple[str, ...]
    env: dict[str, str]
    dir: str | None
    timeout: float
    cookie: bytes
    enable_threaded_blas: bool

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> _Options:
        return cls(
            tunnel=_check_bool(params.get("tunnel", False), "tunnel"),
            multiplex=_check_bool(params.get("multiplex", False), "multiplex"),
            sshflags=_argv_tuple(params.get("sshflags"), "sshflags"),
            max_parallel=_check_max_parallel(params.get("max_parallel", 10)),
            ssh=str(params.get("ssh") or "ssh"),
            exename=str(params.get("exename") or DEFAULT_PYTHON),
            exeflags=_argv_tuple(params.get("exeflags"), "exeflags"),
            env=_env_dict(params.get("env")),
            dir=str(params["dir"]) if params.get("dir") else None,
            timeout=float(params.get("timeout") or 60.0),
            cookie=bytes(params.get("cookie") or b""),
            enable_threaded_blas=bool(params.get("enable_threaded_blas")),
        )


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")
    return value


def _check_max_parallel(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_parallel must be a positive int, not {value!r}")
    return value


def _argv_tuple(value: object, name: str) -> tuple[str, ...]:
    """``None``, a string (split like a shell would) or a sequence of strings -> tuple."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(shlex.split(value))
    if isinstance(value, Sequence) and all(isinstance(v, (str, os.PathLike)) for v in value):
        return tuple(os.fspath(v) for v in value)
    raise TypeError(f"{name} must be a string or a sequence of strings, not {value!r}")


def _env_dict(value: object) -> dict[str, str]:
    if not value:
        return {}
    items: Iterable[Any] = value.items() if isinstance(value, Mapping) else value  # type: ignore[assignment]
    out = {}
    for item in items:
        key, val = item
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise ValueError(f"env: {key!r} is not a valid environment variable name")
        out[key] = str(val)
    return out


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# ---------------------------------------------------------------------------- the manager


class SSHManager(ClusterManager):
    """Starts workers on other machines over ssh (Julia's ``SSHManager``).

    *machines* is a list of ``"[user@]host[:port] [bind_addr[:port]]"`` specs and
    ``(spec, count)`` pairs, ``count`` an int or ``"auto"`` (one worker per usable CPU there,
    asked over ssh first). Entries for the same machine are merged, counts adding up. A fixed
    ``bind_addr:port`` gives the machine's workers consecutive ports from that one.

    The keyword arguments are the defaults of ``addprocs``'s keywords of the same names:
    ``tunnel`` (reach each worker through an ``ssh -L`` forward), ``multiplex`` (one ssh
    connection per machine, its workers' sessions multiplexed over it; default False),
    ``sshflags`` (extra ssh options, e.g. ``("-F", cfg)`` or ``"-i key"``), ``max_parallel``
    (sessions opened at once per machine) and ``ssh`` (the client program). See the module
    docstring for how a worker is started, kept and stopped.

    Raises:
        TypeError, ValueError: a malformed machine list (the message names the entry).
    """

    def __init__(
        self,
        machines: Iterable[str | tuple[str, int | str]],
        *,
        tunnel: bool = False,
        multiplex: bool = False,
        sshflags: str | Sequence[str] = (),
        max_parallel: int = 10,
        ssh: str = "ssh",
    ) -> None:
        self.machines: list[Machine] = merge_machines(machines)
        self.tunnel = _check_bool(tunnel, "tunnel")
        self.multiplex = _check_bool(multiplex, "multiplex")
        self.sshflags = _argv_tuple(sshflags, "sshflags")
        self.max_parallel = _check_max_parallel(max_parallel)
        self.ssh = ssh

    def __repr__(self) -> str:
        machines = ", ".join(
            repr(m.spec) if m.count == 1 else f"({m.spec!r}, {m.count!r})" for m in self.machines
        )
        return f"SSHManager([{machines}], tunnel={self.tunnel})"

    def default_params(self) -> dict[str, Any]:
        return {
            "tunnel": self.tunnel,
            "multiplex": self.multiplex,
            "sshflags": self.sshflags,
            "max_parallel": self.max_parallel,
            "ssh": self.ssh,
        }

    # ------------------------------------------------------------------ commands

    def worker_argv(
        self,
        machine: Machine,
        params: Mapping[str, Any],
        index: int = 0,
        control_path: str | None = None,
    ) -> list[str]:
        """The ssh command line ``launch`` runs for the *index*-th worker on *machine*: a
        session of its own, or, given the *control_path* of a master connection, a session
        multiplexed over that connection."""
        opts = _Options.from_params({**self.default_params(), **params})
        return self._worker_argv(machine, index, opts, control_path)

    def _ssh_argv(
        self, machine: Machine, opts: _Options, *options: str, control: str | None = None
    ) -> list[str]:
        argv = [opts.ssh, "-T", "-a", "-x", "-o", "BatchMode=yes", *_via(control), *options]
        argv += opts.sshflags
        if machine.port is not None:
            argv += ["-p", str(machine.port)]
        return [*argv, "--", machine.destination]

    def _worker_argv(
        self, machine: Machine, index: int, opts: _Options, control: str | None = None
    ) -> list[str]:
        steps = [_export(_remote_env(opts))]
        if opts.dir:
            steps.insert(0, f"cd -- {_quote_dir(opts.dir)}")
        worker = shlex.join([opts.exename, *opts.exeflags, "-m", "distexec.worker"])
        bind = machine.bind_addr
        if bind is None and opts.tunnel:
            bind = "127.0.0.1"
        elif bind is None and _is_ip(machine.host):
            bind = machine.host
        if bind is None:
            # The address ssh reached the host at: the 3rd word of $SSH_CONNECTION.
            steps.append("set -- $SSH_CONNECTION")
            worker += f' --bind "${{3:-{machine.host}}}"'
        else:
            worker += f" --bind {shlex.quote(bind)}"
        if machine.bind_port is not None:
            worker += f" --port {machine.bind_port + index}"
        if bind is None or not _is_loopback(bind):
            worker += " --allow-insecure-network"  # TODO(tls): pass TLS options instead
        steps.append(f"exec {worker}")
        return [
            *self._ssh_argv(machine, opts, "-o", "ClearAllForwardings=yes", control=control),
            _sh_command(steps),
        ]

    # ------------------------------------------------------------------ launch

    def launch(
        self,
        params: Mapping[str, Any],
        launched: list[WorkerConfig],
        launch_ntfy: threading.Condition,
    ) -> None:
        """Start every machine's workers, machines in parallel; raise one ``LaunchError``
        naming every worker that failed, after the others were handed to the cluster."""
        opts = _Options.from_params(params)
        errors: list[BaseException] = []
        errors_lock = threading.Lock()  # guards: errors

        def run_machine(machine: Machine) -> None:
            mux = _Multiplexer(self, machine, opts) if opts.multiplex else None
            try:
                count = machine.count
                if count == "auto":
                    count = self._remote_cpu_count(machine, opts, mux)
                if machine.bind_port is not None and machine.bind_port + count - 1 > 65535:
                    raise LaunchError(
                        f"{machine.spec}: {count} workers from port {machine.bind_port} "
                        "go past 65535",
                        host=machine.host,
                    )
                with cf.ThreadPoolExecutor(
                    max_workers=min(count, opts.max_parallel),
                    thread_name_prefix=f"distexec-ssh-{machine.host}",
                ) as pool:
                    futures = [
                        pool.submit(
                            self._start_worker, machine, i, opts, launched, launch_ntfy, mux
                        )
                        for i in range(count)
                    ]
                failed = [exc for f in futures if (exc := f.exception()) is not None]
            except Exception as exc:
                failed = [exc]
            finally:
                if mux is not None:
                    mux.release()  # each master now ends with the last of its sessions
            if failed:
                with errors_lock:
                    errors.extend(failed)

        threads = [
            threading.Thread(
                target=run_machine, args=(m,), name=f"distexec-ssh-{m.host}", daemon=True
            )
            for m in self.machines
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise _combine(errors)

    def _start_worker(
        self,
        machine: Machine,
        index: int,
        opts: _Options,
        launched: list[WorkerConfig],
        launch_ntfy: threading.Condition,
        mux: _Multiplexer | None = None,
    ) -> None:
        master = mux.master(index) if mux is not None else None
        control = master.control_path if master is not None else None
        proc, io, tunnel = self._open_session(machine, index, opts, control)
        if master is not None:
            master.add_session(proc)
        bind_addr = machine.bind_addr
        if bind_addr is not None and _is_wildcard(bind_addr):
            bind_addr = machine.host  # it listens everywhere: dial where ssh went
        config = WorkerConfig(
            io=io,
            process=proc,
            host=machine.host,
            count=machine.count,
            exename=opts.exename,
            exeflags=opts.exeflags,
            tunnel=opts.tunnel,
            multiplex=control is not None,
            sshflags=opts.sshflags,
            max_parallel=opts.max_parallel,
            bind_addr=None if opts.tunnel else bind_addr,
            enable_threaded_blas=opts.enable_threaded_blas,
            userdata={
                "machine": machine.spec,
                "destination": machine.destination,
                "index": index,
                "tunnel": tunnel,
                "master": master,
            },
        )
        with launch_ntfy:
            launched.append(config)
            launch_ntfy.notify_all()

    def _open_session(
        self, machine: Machine, index: int, opts: _Options, control: str | None
    ) -> tuple[subprocess.Popen[bytes], Any, _Tunnel | None]:
        """Start the worker's session, cookie on its stdin; wait until it is running (tunnel
        mode: until its forward is open). Returns the session, what to read its output
        from, and the tunnel."""
        argv = self._worker_argv(machine, index, opts, control)
        proc = _popen(argv, machine, stdin=subprocess.PIPE)
        tunnel: _Tunnel | None = None
        try:
            assert proc.stdin is not None
            try:
                proc.stdin.write(opts.cookie + b"\n")
                proc.stdin.flush()
            except BrokenPipeError:
                pass  # ssh is gone already: the wait below reports why
            deadline = time.monotonic() + opts.timeout
            if opts.tunnel:
                tunnel = self._tunnel_to(machine, opts, proc, deadline, control)
                io: Any = tunnel.reader
            else:
                _echo_stderr(machine, _await_output(machine, opts, proc, deadline))
                assert proc.stdout is not None
                io = proc.stdout
        except BaseException:
            _discard(proc)
            raise
        return proc, io, tunnel

    def _remote_cpu_count(
        self, machine: Machine, opts: _Options, mux: _Multiplexer | None = None
    ) -> int:
        """``count="auto"``: ask the machine how many CPUs a worker there may use (over the
        first master connection, which the first workers then use too)."""
        steps = [
            _export(_remote_env(opts)),
            "exec " + shlex.join([opts.exename, *opts.exeflags, "-c", _CPU_COUNT_SCRIPT]),
        ]
        control = mux.master(0).control_path if mux is not None else None
        argv = [*self._ssh_argv(machine, opts, control=control), _sh_command(steps)]
        try:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=opts.timeout,
                start_new_session=True,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise WorkerTimeoutError(
                f"{machine.spec}: no answer to how many CPUs it has (count='auto') "
                f"within {opts.timeout:g} s",
                host=machine.host,
            ) from None
        except OSError as exc:
            raise LaunchError(f"could not run {opts.ssh!r}: {exc}", host=machine.host) from exc
        for line in result.stdout.decode(errors="replace").splitlines():
            words = line.split()
            if len(words) == 2 and words[0] == "distexec-cpus" and words[1].isdigit():
                return max(1, int(words[1]))
        tail = _tail_text(result.stderr)
        raise LaunchError(
            f"{machine.spec}: could not ask for its CPU count (count='auto'): "
            f"{_exit_phrase(result.returncode)}{_output_suffix(tail)}",
            host=machine.host,
            stderr_tail=tail,
        )

    # ------------------------------------------------------------------ tunnels

    def _tunnel_to(
        self,
        machine: Machine,
        opts: _Options,
        proc: subprocess.Popen[bytes],
        deadline: float,
        control: str | None = None,
    ) -> _Tunnel:
        """Read the worker's banner, forward a local port to it, hand on a rewritten banner."""
        early, host, port, rest = _await_banner(machine, opts, proc, deadline)
        forward, local_port, spec = self._open_forward(machine, opts, host, port, deadline, control)
        banner = f"{BANNER}127.0.0.1:{local_port}\n".encode()
        cancel = None
        if control is not None:
            cancel_argv = self._ssh_argv(machine, opts, "-O", "cancel", "-L", spec, control=control)
            cancel = functools.partial(_run_quietly, cancel_argv, 5.0)
        try:
            return _Tunnel(machine, proc, forward, local_port, early + banner + rest, cancel)
        except BaseException:
            if forward is not None:
                _discard(forward)
            elif cancel is not None:
                cancel()
            raise

    def _open_forward(
        self,
        machine: Machine,
        opts: _Options,
        host: str,
        port: int,
        deadline: float,
        control: str | None = None,
    ) -> tuple[subprocess.Popen[bytes] | None, int, str]:
        """A local port forwarded to the worker's *host*:*port*: an ``ssh -L`` of its own, or
        (*control*) a forward that the master connection holds (``ssh -O forward``)."""
        problems = []
        candidates = [port]
        for _ in range(_TUNNEL_TRIES):
            local_port = next((p for p in candidates if _port_free(p)), None)
            candidates = []
            if local_port is None:
                local_port = _free_port()
            spec = f"127.0.0.1:{local_port}:{_bracket(host)}:{port}"
            if control is not None:
                failure = self._mux_forward(machine, opts, control, spec, deadline)
                if failure is None:
                    return None, local_port, spec
                if not _BIND_FAILED.search(failure.stderr_tail):
                    raise failure
                problems.append(str(failure))
                continue
            argv = [
                *self._ssh_argv(
                    machine,
                    opts,
                    "-o",
                    "ExitOnForwardFailure=yes",
                    "-L",
                    spec,
                ),
                _sh_command([f"echo {_TUNNEL_READY}", "exec cat >/dev/null"]),
            ]
            forward = _popen(argv, machine, stdin=subprocess.PIPE)
            ready = False
            try:
                ready, err = _await_marker(forward, _TUNNEL_READY.encode(), deadline)
                if ready:
                    _echo_stderr(machine, err)
                    return forward, local_port, spec
                what = f"ssh -L {local_port}"
                if time.monotonic() >= deadline:
                    raise _timeout(machine, opts, forward, err, "the tunnel")
                failure = _failure(machine, forward, err, what, "the tunnel")
            finally:
                if not ready:
                    _discard(forward)
            if not _BIND_FAILED.search(failure.stderr_tail):
                raise failure
            problems.append(str(failure))
        raise LaunchError(
            f"{machine.spec}: could not open an ssh tunnel after {_TUNNEL_TRIES} "
            "tries: " + "; ".join(problems),
            host=machine.host,
        )

    def _mux_forward(
        self, machine: Machine, opts: _Options, control: str, spec: str, deadline: float
    ) -> LaunchError | None:
        """Ask the master connection to forward *spec* (``ssh -O forward -L``): None if it
        does, else the error."""
        argv = self._ssh_argv(machine, opts, "-O", "forward", "-L", spec, control=control)
        try:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=max(0.1, deadline - time.monotonic()),
                start_new_session=True,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise WorkerTimeoutError(
                f"{machine.spec}: the tunnel did not start within {opts.timeout:g} s "
                "(DISTEXEC_WORKER_TIMEOUT or addprocs(timeout=...))",
                host=machine.host,
            ) from None
        except OSError as exc:
            raise LaunchError(f"could not run {opts.ssh!r}: {exc}", host=machine.host) from exc
        if result.returncode == 0:
            return None
        tail = _tail_text(result.stderr)
        return LaunchError(
            f"{machine.spec}: ssh -O forward -L {spec} failed ({_exit_phrase(result.returncode)})"
            + _output_suffix(tail),
            host=machine.host,
            stderr_tail=tail,
        )

    def _master_argv(self, machine: Machine, opts: _Options, control_path: str) -> list[str]:
        """The master connection: its own session is the lifeline, a ``cat`` of our pipe."""
        options = ("ControlMaster=yes", f"ControlPath={control_path}", "ControlPersist=no")
        return [
            *self._ssh_argv(
                machine,
                opts,
                *(arg for option in options for arg in ("-o", option)),
                "-o",
                "ClearAllForwardings=yes",
            ),
            _sh_command(["exec cat >/dev/null"]),
        ]

    # ------------------------------------------------------------------ life cycle

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        """``"deregister"``/``"finalize"`` close the worker's tunnel, if it has one; after
        a machine's last worker they wait (up to 2 s) until its master connection is gone.

        ``"interrupt"`` does nothing: the cluster's interrupt message is enough.
        """
        if op in ("deregister", "finalize"):
            tunnel = _userdata(config).get("tunnel")
            if isinstance(tunnel, _Tunnel):
                tunnel.close()
            master = _userdata(config).get("master")
            if isinstance(master, _Master):
                master.settle(_SETTLE_TIMEOUT)

    def kill(self, pid: int, config: WorkerConfig) -> None:
        """Close the session's stdin: the remote worker sees EOF and exits.

        The cluster has sent the exit message already, and afterwards waits for the local
        ssh to end, escalating to SIGTERM/SIGKILL on it (which ends the session too).
        """
        proc = config.process
        if isinstance(proc, subprocess.Popen) and proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass


def _userdata(config: WorkerConfig) -> Mapping[str, Any]:
    return config.userdata if isinstance(config.userdata, Mapping) else {}


def _quote_dir(path: str) -> str:
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def _export(env: Mapping[str, str]) -> str:
    return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())


def _sh_command(steps: list[str]) -> str:
    """``exec sh -c '<steps joined by &&>'``: one string for the remote login shell."""
    return shlex.join(["exec", "sh", "-c", " && ".join(steps)])


def _output_suffix(tail: str) -> str:
    return f"; output:\n  {_indent(tail)}" if tail else ""


def _remote_env(opts: _Options) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1"}
    if not opts.enable_threaded_blas:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"
    timeout = os.environ.get("DISTEXEC_WORKER_TIMEOUT")
    if timeout:
        env["DISTEXEC_WORKER_TIMEOUT"] = timeout
    env.update(opts.env)
    return env


# ---------------------------------------------------------------------------- processes


def _popen(argv: list[str], machine: Machine, *, stdin: int) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            start_new_session=True,  # no terminal to prompt on; Ctrl-C reaches the master only
        )
    except OSError as exc:
        raise LaunchError(f"could not run {argv[0]!r}: {exc}", host=machine.host) from exc


def _discard(proc: subprocess.Popen[bytes]) -> None:
    """Stop a session we will not hand on, reap it and close its pipes."""
    if proc.poll() is None:
        try:
            proc.kill()
        except ProcessLookupError:  # pragma: no cover
            pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
        pass
    _close_streams(proc)


def _close_streams(proc: subprocess.Popen[bytes]) -> None:
    """Close our ends of *proc*'s pipes (an error closing one changes nothing)."""
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def _pending_bytes(fd: int) -> int:
    """Bytes waiting in pipe *fd* (0 at EOF), or -1 if the platform cannot say."""
    try:
        import fcntl
        import struct
        import termios

        raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", raw)[0])
    except (ImportError, OSError):  # pragma: no cover
        return -1


def _read_into(fd: int, buf: bytearray) -> bool:
    """Append what *fd* has to *buf* (keeping the last ``_STDERR_KEEP`` bytes); False at EOF."""
    try:
        chunk = os.read(fd, 65536)
    except OSError:
        chunk = b""
    buf += chunk
    if len(buf) > _STDERR_KEEP:
        del buf[:-_STDERR_KEEP]
    return bool(chunk)


def _await_output(
    machine: Machine, opts: _Options, proc: subprocess.Popen[bytes], deadline: float
) -> bytes:
    """Wait until the session prints something (logged in, worker running) without reading
    it; return what ssh said on stderr meanwhile. Raises ``LaunchError`` if it ends first."""
    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    err = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(out_fd, selectors.EVENT_READ)
        sel.register(err_fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timeout(machine, opts, proc, err)
            for key, _ in sel.select(remaining):
                if key.fd == err_fd:
                    if not _read_into(err_fd, err):
                        sel.unregister(err_fd)
                elif _pending_bytes(out_fd) != 0:
                    return bytes(err)
                else:
                    raise _failure(machine, proc, err)


def _await_banner(
    machine: Machine, opts: _Options, proc: subprocess.Popen[bytes], deadline: float
) -> tuple[bytes, str, int, bytes]:
    """Read the session's stdout up to the worker's banner: (lines before, host, port, rest)."""
    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    err = bytearray()
    out = bytearray()
    early = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(out_fd, selectors.EVENT_READ)
        sel.register(err_fd, selectors.EVENT_READ)
        while True:
            while b"\n" in out:
                end = out.index(b"\n") + 1
                line = bytes(out[:end])
                del out[:end]
                text = line.decode(errors="replace").rstrip("\r\n")
                if text.startswith(BANNER):
                    _echo_stderr(machine, bytes(err))
                    try:
                        host, port = _parse_banner(text)
                    except LaunchError as exc:
                        raise LaunchError(str(exc), host=machine.host) from None
                    return bytes(early), host, port, bytes(out)
                early += line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timeout(machine, opts, proc, err)
            for key, _ in sel.select(remaining):
                if key.fd == err_fd:
                    if not _read_into(err_fd, err):
                        sel.unregister(err_fd)
                else:
                    try:
                        chunk = os.read(out_fd, 65536)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        err[:0] = early  # what it printed may explain why
                        raise _failure(machine, proc, err)
                    out += chunk


def _await_marker(
    proc: subprocess.Popen[bytes], marker: bytes, deadline: float
) -> tuple[bool, bytearray]:
    """Whether *proc* printed the line *marker* before EOF and *deadline*; and its stderr."""
    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    err = bytearray()
    out = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(out_fd, selectors.EVENT_READ)
        sel.register(err_fd, selectors.EVENT_READ)
        while marker not in out.split(b"\n")[:-1]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False, err
            for key, _ in sel.select(remaining):
                if key.fd == err_fd:
                    if not _read_into(err_fd, err):
                        sel.unregister(err_fd)
                elif not _read_into(out_fd, out):
                    err[:0] = out
                    return False, err
    return True, err


def _drain(proc: subprocess.Popen[bytes], err: bytearray, timeout: float) -> int | None:
    """Wait for *proc* to end and read the rest of its stderr, both bounded by *timeout*."""
    deadline = time.monotonic() + timeout
    try:
        code: int | None = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    if proc.stderr is not None and not proc.stderr.closed:
        fd = proc.stderr.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while (remaining := deadline - time.monotonic()) > 0:
                if sel.select(min(remaining, 0.5)) and not _read_into(fd, err):
                    break
                if not sel.select(0) and code is not None:
                    break  # ended and nothing more to read (a child may hold the pipe)
    return code


def _tail_text(data: bytes | bytearray) -> str:
    lines = [ln for ln in bytes(data).decode(errors="replace").splitlines() if ln.strip()]
    return "\n".join(lines[-_TAIL_LINES:])


def _indent(text: str) -> str:
    return text.replace("\n", "\n  ")


def _exit_phrase(code: int | None) -> str:
    if code is None:
        return "it is still running"
    if code == 255:
        return "ssh failed (exit status 255)"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit status {code}"


def _failure(
    machine: Machine,
    proc: subprocess.Popen[bytes],
    err: bytearray,
    what: str = "ssh",
    subject: str = "the worker",
) -> LaunchError:
    """The error for a session that ended before *subject* was ready (reported its address)."""
    code = _drain(proc, err, 5.0)
    tail = _tail_text(err)
    if code == 255:
        message = f"{machine.spec}: {what} failed (exit status 255)"
    else:
        message = f"{machine.spec}: {subject} ended before it was ready ({_exit_phrase(code)})"
    return LaunchError(message + _output_suffix(tail), host=machine.host, stderr_tail=tail)


def _timeout(
    machine: Machine,
    opts: _Options,
    proc: subprocess.Popen[bytes],
    err: bytearray,
    what: str = "",
) -> WorkerTimeoutError:
    _discard_keep_stderr(proc)
    _drain(proc, err, 1.0)
    tail = _tail_text(err)
    message = (
        f"{machine.spec}: {what or 'the worker'} did not start within {opts.timeout:g} s "
        "(DISTEXEC_WORKER_TIMEOUT or addprocs(timeout=...))"
    )
    return WorkerTimeoutError(message + _output_suffix(tail), host=machine.host, stderr_tail=tail)


def _discard_keep_stderr(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            proc.kill()
        except ProcessLookupError:  # pragma: no cover
            pass


def _echo_stderr(machine: Machine, data: bytes | bytearray) -> None:
    """Show what ssh said before the worker ran (host-key notices, banners)."""
    for line in bytes(data).decode(errors="replace").splitlines():
        if line.strip():
            print(f"distexec: ssh {machine.spec}: {line}", file=sys.stderr, flush=True)


def _combine(errors: list[BaseException]) -> LaunchError:
    if len(errors) == 1 and isinstance(errors[0], LaunchError):
        return errors[0]
    counts: dict[str, int] = {}
    hosts: list[str] = []
    for exc in errors:
        text = str(exc) if isinstance(exc, LaunchError) else f"{type(exc).__name__}: {exc}"
        counts[text] = counts.get(text, 0) + 1
        host = getattr(exc, "host", "")
        if host and host not in hosts:
            hosts.append(host)
    items = [("- " if n == 1 else f"- {n} workers: ") + _indent(text) for text, n in counts.items()]
    first = errors[0]
    combined = LaunchError(
        f"{len(errors)} SSH workers failed to start:\n" + "\n".join(items),
        host=", ".join(hosts),
        stderr_tail=getattr(first, "stderr_tail", ""),
    )
    combined.__cause__ = first
    return combined


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------------------- multiplexing


def _via(control: str | None) -> list[str]:
    """The options that make a session use the master connection at *control* (first, so
    that neither ``sshflags`` nor a config file can change them)."""
    if control is None:
        return []
    return ["-o", "ControlMaster=no", "-o", f"ControlPath={control}"]


def _run_quietly(argv: list[str], timeout: float) -> None:
    """Run a short ssh command (``-O cancel``) whose failure changes nothing."""
    try:
        subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            start_new_session=True,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        pass


class _Multiplexer:
    """The master connections of one machine during one launch: one per
    ``_SESSIONS_PER_MASTER`` workers, started when the first of them asks for it. A master
    that failed to start fails each of its workers with the same error."""

    def __init__(self, manager: SSHManager, machine: Machine, opts: _Options) -> None:
        self._manager = manager
        self._machine = machine
        self._opts = opts
        self._lock = threading.Lock()  # guards: _group_locks
        self._group_locks: dict[int, threading.Lock] = {}
        self._results: dict[int, _Master | LaunchError] = {}  # written under its group's lock

    def __repr__(self) -> str:
        return f"<_Multiplexer {self._machine.spec} masters={list(self._results.values())}>"

    def master(self, index: int) -> _Master:
        """The master connection for the *index*-th worker's session; raises ``LaunchError``
        (a fresh one per worker) if it could not be made."""
        group = index // _SESSIONS_PER_MASTER
        with self._lock:
            group_lock = self._group_locks.setdefault(group, threading.Lock())
        with group_lock:
            result = self._results.get(group)
            if result is None:
                result = self._results[group] = self._start_master()
        if isinstance(result, LaunchError):
            raise type(result)(str(result), host=result.host, stderr_tail=result.stderr_tail)
        return result

    def _start_master(self) -> _Master | LaunchError:
        machine, opts = self._machine, self._opts
        try:
            master = _Master(machine, _control_dir(machine))
            master.start(self._manager._master_argv(machine, opts, master.control_path))
            master.wait_ready(time.monotonic() + opts.timeout, opts)
        except LaunchError as exc:
            return exc
        return master

    def release(self) -> None:
        """The launch is over: let every master end with its last session."""
        for result in list(self._results.values()):
            if isinstance(result, _Master):
                result.release()


_masters: set[_Master] = set()  # the masters whose process may still run
_masters_lock = threading.Lock()  # guards: _masters


class _Master:
    """One ``ssh -M`` connection whose control socket lets a machine's sessions share it.

    Its own session is the lifeline: a remote ``cat`` of a pipe from this process. While the
    launch runs the pipe stays open; :meth:`release` closes it, after which ssh ends the
    master as soon as its last multiplexed session has ended (at once if none is left). If
    this process dies, the pipe closes just the same. A thread reads the master's output,
    reaps it and then removes the control directory. :meth:`close` ends it by pid.
    """

    def __init__(self, machine: Machine, directory: str) -> None:
        self.machine = machine
        self.directory = directory
        self.control_path = os.path.join(directory, _CONTROL_NAME)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ended = threading.Event()
        self._lock = threading.Lock()  # guards: _ready, _err, _released, _sessions
        self._ready = False
        self._err = bytearray()
        self._released = False
        self._sessions: list[subprocess.Popen[bytes]] = []
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "ended" if self.ended.is_set() else "ready" if self._ready else "starting"
        pid = self.proc.pid if self.proc is not None else None
        return f"<_Master {self.machine.spec} pid={pid} {state} {self.control_path}>"

    def start(self, argv: list[str]) -> None:
        try:
            self.proc = _popen(argv, self.machine, stdin=subprocess.PIPE)
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        with _masters_lock:
            _masters.add(self)
        self._thread = threading.Thread(
            target=self._watch, name=f"distexec-ssh-master-{self.machine.host}", daemon=True
        )
        self._thread.start()

    def wait_ready(self, deadline: float, opts: _Options) -> None:
        """Until the control socket exists (ssh links it into place once it listens, right
        after logging in). Raises ``LaunchError`` with ssh's stderr if the master ends first
        or cannot multiplex, ``WorkerTimeoutError`` past *deadline*."""
        assert self.proc is not None
        delay = 0.001
        while True:
            if os.path.exists(self.control_path):
                with self._lock:
                    self._ready = True
                    early = bytes(self._err)
                _echo_stderr(self.machine, early)
                return
            with self._lock:
                unusable = b"disabling multiplexing" in self._err
            if self.ended.is_set() or unusable:
                self.close()
                raise self._failure(unusable)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                tail = self._tail()
                raise WorkerTimeoutError(
                    f"{self.machine.spec}: the ssh master connection did not start within "
                    f"{opts.timeout:g} s (DISTEXEC_WORKER_TIMEOUT or addprocs(timeout=...))"
                    + _output_suffix(tail),
                    host=self.machine.host,
                    stderr_tail=tail,
                )
            self.ended.wait(min(delay, remaining))
            delay = min(2 * delay, 0.02)

    def _tail(self) -> str:
        with self._lock:
            return _tail_text(self._err)

    def _failure(self, unusable: bool) -> LaunchError:
        assert self.proc is not None
        code = self.proc.returncode
        tail = self._tail()
        if unusable:
            message = f"{self.machine.spec}: ssh could not share its connection (multiplex=False?)"
        elif code == 255:
            message = f"{self.machine.spec}: ssh failed (exit status 255)"
        else:
            message = (
                f"{self.machine.spec}: the ssh master connection ended before it was ready "
                f"({_exit_phrase(code)})"
            )
        return LaunchError(message + _output_suffix(tail), host=self.machine.host, stderr_tail=tail)

    def add_session(self, session: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._sessions.append(session)

    def settle(self, timeout: float) -> None:
        """After a worker was removed: if no session is left and the launch is over, wait
        up to *timeout* seconds for the master to be gone (reaped, directory removed)."""
        with self._lock:
            last = self._released and all(s.poll() is not None for s in self._sessions)
        if last:
            self.ended.wait(timeout)

    def release(self) -> None:
        """Close the lifeline (idempotent): ssh ends the master after its last session."""
        with self._lock:
            self._released = True
        stdin = self.proc.stdin if self.proc is not None else None
        if stdin is not None:
            try:
                stdin.close()
            except OSError:
                pass

    def close(self, grace: float = 0.0) -> None:
        """End the master: *grace* seconds to end on its own, then SIGTERM, SIGKILL; reap it
        and remove the control directory (idempotent)."""
        self.release()
        proc = self.proc
        if proc is not None:
            stop_process(proc, grace=grace)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _watch(self) -> None:
        """Read the master's output (keeping stderr until it is ready, then logging it) until
        it ends; reap it; remove the control directory."""
        proc = self.proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        err_fd = proc.stderr.fileno()
        pending = b""
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout.fileno(), selectors.EVENT_READ)
                sel.register(err_fd, selectors.EVENT_READ)
                while sel.get_map():
                    for key, _ in sel.select():
                        try:
                            chunk = os.read(key.fd, 65536)
                        except OSError:
                            chunk = b""
                        if not chunk:
                            sel.unregister(key.fd)
                        if key.fd != err_fd:
                            continue  # the remote cat prints nothing; a chatty login shell may
                        with self._lock:
                            if not self._ready:
                                self._err += chunk
                                del self._err[:-_STDERR_KEEP]
                                continue
                        pending += chunk if chunk else b"\n"
                        *lines, pending = pending.split(b"\n")
                        for line in lines:
                            _log_line(f"ssh master connection to {self.machine.spec}", line)
            proc.wait()
        finally:
            _close_streams(proc)
            shutil.rmtree(self.directory, ignore_errors=True)
            with _masters_lock:
                _masters.discard(self)
            self.ended.set()


def _control_dir(machine: Machine) -> str:
    """A new private directory (mode 0700) for one control socket, in the temporary directory
    or, if its path is too long for a socket (or has characters ssh would expand), in /tmp.
    Directories of dead distexec processes there (killed before they could remove theirs)
    are removed first."""
    base = tempfile.gettempdir()
    room = _SUN_PATH_MAX - _SSH_BIND_SUFFIX - len(f"/{_CONTROL_DIR_PREFIX}{os.getpid()}-12345678/c")
    if (len(os.fsencode(base)) >= room or not _SAFE_PATH.match(base)) and os.path.isdir("/tmp"):
        base = "/tmp"
    if len(os.fsencode(base)) >= room or not _SAFE_PATH.match(base):
        raise LaunchError(
            f"{machine.spec}: no directory for an ssh control socket ({base!r} is too long or "
            "has special characters): set TMPDIR, or pass multiplex=False",
            host=machine.host,
        )
    _remove_stale_control_dirs(base)
    try:
        return tempfile.mkdtemp(prefix=f"{_CONTROL_DIR_PREFIX}{os.getpid()}-", dir=base)
    except OSError as exc:
        raise LaunchError(
            f"{machine.spec}: cannot create a directory for an ssh control socket: {exc}",
            host=machine.host,
        ) from exc


_STALE_DIR = re.compile(rf"{_CONTROL_DIR_PREFIX}(\d+)-[A-Za-z0-9_]+\Z")


def _remove_stale_control_dirs(base: str) -> None:
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        m = _STALE_DIR.match(name)
        if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _forget_masters_in_child() -> None:
    """A forked child (a local worker, a multiprocessing child) owns none of our masters:
    its exit must not end them nor remove their directories."""
    global _masters_lock
    _masters.clear()
    _masters_lock = threading.Lock()  # the parent may have held it while forking


os.register_at_fork(after_in_child=_forget_masters_in_child)


@atexit.register
def _end_masters_at_exit() -> None:
    """Masters still running at exit (workers not removed): a second to end on their own,
    then by pid. Their control directories go with them."""
    with _masters_lock:
        masters = list(_masters)
    for master in masters:
        master.release()
    deadline = time.monotonic() + 1.0
    for master in masters:
        master.close(grace=max(0.0, deadline - time.monotonic()))


# ---------------------------------------------------------------------------- tunnel relay


class _Tunnel:
    """A forward to one worker, and the thread that hands the worker's output on.

    The forward is an ``ssh -L`` process of its own (*forward*), or one that the master
    connection holds (*forward* None; *cancel* removes it from the master). The cluster
    reads :attr:`reader`: first the rewritten banner, then whatever the worker prints. When
    the worker's session ends the thread closes :attr:`reader`'s other end and the forward;
    when a forward process ends first it closes the session's stdin (the master's link went
    through it, so the worker is lost anyway). A master connection that ends takes the
    sessions on it along, the worker's included.
    """

    def __init__(
        self,
        machine: Machine,
        session: subprocess.Popen[bytes],
        forward: subprocess.Popen[bytes] | None,
        local_port: int,
        initial: bytes,
        cancel: Callable[[], None] | None = None,
    ) -> None:
        self.destination = machine.destination
        self.local_port = local_port
        self._session = session
        self._forward = forward
        self._cancel = cancel
        read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self.reader: IO[bytes] = os.fdopen(read_fd, "rb", buffering=0)
        self._lock = threading.Lock()  # guards: _closing
        self._closing = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(initial,), name=f"distexec-tunnel-{local_port}", daemon=True
        )
        self._thread.start()

    def __repr__(self) -> str:
        state = "closed" if self._stopped.is_set() else "open"
        return f"<_Tunnel 127.0.0.1:{self.local_port} -> {self.destination} {state}>"

    def close(self) -> None:
        """Stop the forward (idempotent): EOF to its remote ``cat``, then signals; reap it.
        A forward the master holds is cancelled there."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        proc = self._forward
        if proc is None:
            if self._cancel is not None:
                self._cancel()
            self._stopped.set()
            return
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        stop_process(proc)
        self._stopped.set()

    def _write(self, data: bytes) -> None:
        """Write to the cluster's end; give up (dropping output) once we are closing."""
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._write_fd, view)
                view = view[n:]
            except BlockingIOError:
                with selectors.DefaultSelector() as sel:
                    sel.register(self._write_fd, selectors.EVENT_WRITE)
                    while not sel.select(0.5):
                        if self._closing:
                            return
            except OSError:  # the reader was closed: nobody listens any more
                return

    def _run(self, initial: bytes) -> None:
        session, forward = self._session, self._forward
        assert session.stdout is not None
        out_fd = session.stdout.fileno()
        fwd_fds: set[int] = set()
        fwd_err_fd = -1
        if forward is not None:
            assert forward.stdout is not None and forward.stderr is not None
            fwd_err_fd = forward.stderr.fileno()
            fwd_fds = {forward.stdout.fileno(), fwd_err_fd}
        err_buf = b""
        try:
            self._write(initial)
            with selectors.DefaultSelector() as sel:
                sel.register(out_fd, selectors.EVENT_READ)
                for fd in fwd_fds:
                    sel.register(fd, selectors.EVENT_READ)
                while True:
                    for key, _ in sel.select():
                        try:
                            chunk = os.read(key.fd, 65536)
                        except OSError:
                            chunk = b""
                        if key.fd == out_fd:
                            if not chunk:
                                return  # the worker's session ended
                            self._write(chunk)
                            continue
                        if key.fd == fwd_err_fd:
                            err_buf += chunk if chunk else b"\n"
                            *lines, err_buf = err_buf.split(b"\n")
                            for line in lines:
                                _log_line(f"ssh tunnel to {self.destination}", line)
                        if not chunk:
                            sel.unregister(key.fd)
                            fwd_fds.discard(key.fd)
                            if not fwd_fds and not self._closing:
                                _log_line(
                                    f"ssh tunnel to {self.destination}", b"the ssh tunnel closed"
                                )
                                if session.stdin is not None:
                                    try:
                                        session.stdin.close()
                                    except OSError:
                                        pass
        finally:
            os.close(self._write_fd)
            self.close()
            streams: list[IO[bytes] | None] = [session.stdout]
            if forward is not None:
                streams += [forward.stdout, forward.stderr]
            for stream in streams:
                if stream is None:
                    continue
                try:
                    stream.close()
                except OSError:
                    pass


def _log_line(who: str, line: bytes) -> None:
    text = line.decode(errors="replace").rstrip("\r")
    if text.strip():
        print(f"distexec: {who}: {text}", file=sys.stderr, flush=True)

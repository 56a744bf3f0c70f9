"""SSHManager: workers on other machines, each started by its own ``ssh`` session.

Layer: L3 managers. Imports: stdlib, distexec._machinefile, distexec.errors, .base, .local.

Julia: ``SSHManager``, what ``addprocs(["host", ("user@host:22", 2), ("host", "auto")])`` uses.

How a worker starts
    One ``ssh`` process per worker (Julia starts one per host and has the first worker
    spawn the others; one per worker is simpler and keeps every worker's lifetime tied to
    a session of its own). Sessions to one machine start at most ``max_parallel`` at a time
    (sshd drops unauthenticated connections beyond ``MaxStartups``, 10 by default); a slot
    is held until the worker has printed something, i.e. ssh has logged in. The command is::

        ssh -T -a -x -o BatchMode=yes -o ClearAllForwardings=yes [sshflags] [-p port] \\
            -- [user@]host "exec sh -c 'cd -- DIR && export K=V ... && \\
            exec PYTHON EXEFLAGS -m distexec.worker --bind ADDR [--port P] [...]'"

    ssh keeps the first value it is given for an option, so ``sshflags`` cannot turn batch
    mode off (nothing may prompt) nor add forwardings to a worker's session. The remote
    login shell only has to understand ``exec sh -c '...'`` (bash, zsh, csh and fish all
    do); the rest is POSIX ``sh``. The remote environment is sshd's, not ours:
    ``env=`` is exported in the command (servers usually accept only ``LANG LC_*`` through
    ``SetEnv``), together with ``PYTHONUNBUFFERED=1``, one BLAS thread unless
    ``enable_threaded_blas``, and ``DISTEXEC_WORKER_TIMEOUT`` if it is set here.

The cookie
    goes to ssh's stdin followed by a newline, never on a command line. stdin then stays
    open: without a terminal the remote worker gets no SIGHUP when the session dies, but it
    sees EOF on stdin and exits. So the session is the worker's lifeline: closing it (``kill``
    closes ssh's stdin), killing the local ssh, or this process dying makes the worker exit.

Which address a worker listens on
    ``bind_addr`` from the spec if given; else the host if it is an IP address; else the
    address ssh reached the host at, taken remotely from ``$SSH_CONNECTION`` (so an ssh alias
    or a name that resolves to 127.0.1.1 over there still gives a reachable address). The
    worker reports that address and the master (and the other workers) dial it. Until TLS
    exists, a worker listening on a non-loopback address gets ``--allow-insecure-network``:
    the link is cookie-authenticated but not encrypted. Use ``tunnel=True`` to avoid that.

``tunnel=True``
    The worker listens on the remote host's 127.0.0.1 (or the spec's ``bind_addr``). Once it
    reports its port, a second ssh runs ``-L 127.0.0.1:LPORT:127.0.0.1:PORT`` (with
    ``ExitOnForwardFailure``) and a remote ``cat`` that exits when this process goes away;
    ``LPORT`` is the worker's own port number when that is free here, so the address the
    master dials is also valid on the worker's host, and workers on one host reach each
    other. The banner the cluster reads is rewritten to ``127.0.0.1:LPORT`` by a thread
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

import concurrent.futures as cf
import ipaddress
import os
import re
import selectors
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from .._machinefile import Machine, merge_machines
from ..errors import LaunchError, WorkerTimeoutError
from .base import ClusterManager, WorkerConfig
from .local import BANNER, _parse_banner

__all__ = ["SSHManager"]

#: The remote interpreter when ``exename`` is not given.
DEFAULT_PYTHON = "python3"

_TUNNEL_READY = "distexec-tunnel-ready"
_TUNNEL_TRIES = 5
_STDERR_KEEP = 1 << 16  # bytes of early ssh stderr kept for error messages
_TAIL_LINES = 15
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_BIND_FAILED = re.compile(r"Address already in use|cannot listen|local forwarding", re.I)

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
    ``tunnel`` (reach each worker through an ``ssh -L`` forward), ``sshflags`` (extra ssh
    options, e.g. ``("-F", cfg)`` or ``"-i key"``), ``max_parallel`` (sessions opened at
    once per machine) and ``ssh`` (the client program). See the module docstring for how a
    worker is started, kept and stopped.

    Raises:
        TypeError, ValueError: a malformed machine list (the message names the entry).
    """

    def __init__(
        self,
        machines: Iterable[str | tuple[str, int | str]],
        *,
        tunnel: bool = False,
        sshflags: str | Sequence[str] = (),
        max_parallel: int = 10,
        ssh: str = "ssh",
    ) -> None:
        self.machines: list[Machine] = merge_machines(machines)
        self.tunnel = _check_bool(tunnel, "tunnel")
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
            "sshflags": self.sshflags,
            "max_parallel": self.max_parallel,
            "ssh": self.ssh,
        }

    # ------------------------------------------------------------------ commands

    def worker_argv(self, machine: Machine, params: Mapping[str, Any], index: int = 0) -> list[str]:
        """The ssh command line ``launch`` runs for the *index*-th worker on *machine*."""
        opts = _Options.from_params({**self.default_params(), **params})
        return self._worker_argv(machine, index, opts)

    def _ssh_argv(self, machine: Machine, opts: _Options, *options: str) -> list[str]:
        argv = [opts.ssh, "-T", "-a", "-x", "-o", "BatchMode=yes", *options, *opts.sshflags]
        if machine.port is not None:
            argv += ["-p", str(machine.port)]
        return [*argv, "--", machine.destination]

    def _worker_argv(self, machine: Machine, index: int, opts: _Options) -> list[str]:
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
            *self._ssh_argv(machine, opts, "-o", "ClearAllForwardings=yes"),
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
            try:
                count = machine.count
                if count == "auto":
                    count = self._remote_cpu_count(machine, opts)
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
                        pool.submit(self._start_worker, machine, i, opts, launched, launch_ntfy)
                        for i in range(count)
                    ]
                failed = [exc for f in futures if (exc := f.exception()) is not None]
            except Exception as exc:
                failed = [exc]
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
    ) -> None:
        argv = self._worker_argv(machine, index, opts)
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
                tunnel = self._tunnel_to(machine, opts, proc, deadline)
                io: Any = tunnel.reader
            else:
                _echo_stderr(machine, _await_output(machine, opts, proc, deadline))
                assert proc.stdout is not None
                io = proc.stdout
        except BaseException:
            _discard(proc)
            raise
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
            sshflags=opts.sshflags,
            max_parallel=opts.max_parallel,
            bind_addr=None if opts.tunnel else bind_addr,
            enable_threaded_blas=opts.enable_threaded_blas,
            userdata={
                "machine": machine.spec,
                "destination": machine.destination,
                "index": index,
                "tunnel": tunnel,
            },
        )
        with launch_ntfy:
            launched.append(config)
            launch_ntfy.notify_all()

    def _remote_cpu_count(self, machine: Machine, opts: _Options) -> int:
        """``count="auto"``: ask the machine how many CPUs a worker there may use."""
        steps = [
            _export(_remote_env(opts)),
            "exec " + shlex.join([opts.exename, *opts.exeflags, "-c", _CPU_COUNT_SCRIPT]),
        ]
        argv = [*self._ssh_argv(machine, opts), _sh_command(steps)]
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
        self, machine: Machine, opts: _Options, proc: subprocess.Popen[bytes], deadline: float
    ) -> _Tunnel:
        """Read the worker's banner, forward a local port to it, hand on a rewritten banner."""
        early, host, port, rest = _await_banner(machine, opts, proc, deadline)
        forward, local_port = self._open_forward(machine, opts, host, port, deadline)
        banner = f"{BANNER}127.0.0.1:{local_port}\n".encode()
        try:
            return _Tunnel(machine, proc, forward, local_port, early + banner + rest)
        except BaseException:
            _discard(forward)
            raise

    def _open_forward(
        self, machine: Machine, opts: _Options, host: str, port: int, deadline: float
    ) -> tuple[subprocess.Popen[bytes], int]:
        problems = []
        candidates = [port]
        for _ in range(_TUNNEL_TRIES):
            local_port = next((p for p in candidates if _port_free(p)), None)
            candidates = []
            if local_port is None:
                local_port = _free_port()
            argv = [
                *self._ssh_argv(
                    machine,
                    opts,
                    "-o",
                    "ExitOnForwardFailure=yes",
                    "-L",
                    f"127.0.0.1:{local_port}:{_bracket(host)}:{port}",
                ),
                _sh_command([f"echo {_TUNNEL_READY}", "exec cat >/dev/null"]),
            ]
            forward = _popen(argv, machine, stdin=subprocess.PIPE)
            ready = False
            try:
                ready, err = _await_marker(forward, _TUNNEL_READY.encode(), deadline)
                if ready:
                    _echo_stderr(machine, err)
                    return forward, local_port
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

    # ------------------------------------------------------------------ life cycle

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        """``"deregister"``/``"finalize"`` close the worker's tunnel, if it has one.

        ``"interrupt"`` does nothing: the cluster's interrupt message is enough.
        """
        if op in ("deregister", "finalize"):
            tunnel = _userdata(config).get("tunnel")
            if isinstance(tunnel, _Tunnel):
                tunnel.close()

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


# ---------------------------------------------------------------------------- tunnel relay


class _Tunnel:
    """An ``ssh -L`` forward to one worker, and the thread that hands the worker's output on.

    The cluster reads :attr:`reader`: first the rewritten banner, then whatever the worker
    prints. When the worker's session ends the thread closes :attr:`reader`'s other end and
    the forward; when the forward ends first it closes the session's stdin (the master's
    link went through it, so the worker is lost anyway).
    """

    def __init__(
        self,
        machine: Machine,
        session: subprocess.Popen[bytes],
        forward: subprocess.Popen[bytes],
        local_port: int,
        initial: bytes,
    ) -> None:
        self.destination = machine.destination
        self.local_port = local_port
        self._session = session
        self._forward = forward
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
        """Stop the forward (idempotent): EOF to its remote ``cat``, then signals; reap it."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        proc = self._forward
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for step in (None, proc.terminate, proc.kill):
            if step is not None and proc.poll() is None:
                try:
                    step()
                except ProcessLookupError:  # pragma: no cover
                    pass
            try:
                proc.wait(2.0)
                break
            except subprocess.TimeoutExpired:
                continue
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
        assert session.stdout is not None and forward.stdout is not None
        assert forward.stderr is not None
        out_fd = session.stdout.fileno()
        fwd_fds = {forward.stdout.fileno(), forward.stderr.fileno()}
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
                        if key.fd == forward.stderr.fileno():
                            err_buf += chunk if chunk else b"\n"
                            *lines, err_buf = err_buf.split(b"\n")
                            for line in lines:
                                _log_tunnel(self.destination, line)
                        if not chunk:
                            sel.unregister(key.fd)
                            fwd_fds.discard(key.fd)
                            if not fwd_fds and not self._closing:
                                _log_tunnel(self.destination, b"the ssh tunnel closed")
                                if session.stdin is not None:
                                    try:
                                        session.stdin.close()
                                    except OSError:
                                        pass
        finally:
            os.close(self._write_fd)
            self.close()
            for stream in (session.stdout, forward.stdout, forward.stderr):
                try:
                    stream.close()
                except OSError:
                    pass


def _log_tunnel(destination: str, line: bytes) -> None:
    text = line.decode(errors="replace").rstrip("\r")
    if text.strip():
        print(f"distexec: ssh tunnel to {destination}: {text}", file=sys.stderr, flush=True)

"""Real OpenSSH servers for the SSH tests: one on loopback, and one per network-namespace "host".

Layer: tests (infrastructure, not shipped). Imports: stdlib, psutil.

Only :func:`skip_or_fail` touches pytest (lazily): the fixtures in ``tests/ssh/conftest.py``
turn :class:`InfraUnavailable` into a skip (or a failure when ``DISTEXEC_REQUIRE_SSH=1`` /
``DISTEXEC_REQUIRE_NETNS=1``), and scripts or benchmarks may use the classes directly::

    with tempfile.TemporaryDirectory() as tmp:
        keys = SSHKeys.generate(Path(tmp) / "keys")
        with SSHServer(keys, Path(tmp) / "sshd") as server:
            subprocess.run(["ssh", *server.sshflags, server.alias, "true"], timeout=30)

What a test gets
----------------
* :class:`SSHKeys`: an ed25519 host key, a registered user key and an unregistered one.
* :class:`SSHServer`: ``/usr/sbin/sshd -D`` on ``127.0.0.1:<free port>`` (or on a namespace's
  address, port 22), key authentication only, a pinned host key, and a client config
  whose path is in ``sshflags = ("-F", ssh_config)``. That config has a ``Host`` alias
  (``dxhost``) and ``Host *`` defaults, so both ``ssh -F cfg dxhost`` and
  ``ssh -F cfg -p PORT root@127.0.0.1`` work, in batch mode, never prompting.
* :class:`NetnsHosts`: N namespaces ``dxtest-<tag>-a``, ``-b``, ... each with ``lo`` up and
  a veth whose root end is enslaved to a bridge ``dxbr-<tag>`` in the root namespace.
  Addresses come from 198.18.K.0/24 (RFC 2544 benchmarking space, K random and unused):
  the bridge (the master's side) is ``.1``, host *i* is ``.2+i``. No default route, no NAT,
  no forwarding sysctl: every packet stays on the bridge, between namespaces we created.
  All hosts reach each other and the root namespace reaches all of them.

What the remote side looks like (for SSHManager)
------------------------------------------------
* The remote command runs as ``$SHELL -c '<command>'``: here ``/bin/bash``, which sources
  ``~/.bashrc`` even when non-interactive (Debian builds bash so). Its cwd is ``$HOME``.
* The session environment is built by sshd, not inherited from the test process:
  ``HOME USER LOGNAME SHELL MAIL PATH SSH_CLIENT SSH_CONNECTION`` plus whatever
  ``~/.bashrc`` exports (on the dev machines that puts pyenv shims first on ``PATH``, so
  a bare ``python3`` may not be the interpreter running the tests). Hence
  :attr:`SSHServer.python` (``sys.executable``, absolute, same filesystem) and
  :attr:`SSHServer.remote_env` (``PYTHONPATH`` so ``distexec`` imports from this
  checkout); pass them as ``exename=`` and ``env=``, exported in the remote command.
* ``AcceptEnv LANG LC_* DISTEXEC_*``: ``ssh -o SetEnv=DISTEXEC_X=1`` also works, but real
  servers usually accept only ``LANG LC_*``, so do not rely on it.
* Every session also carries ``DISTEXEC_SSHINFRA_TAG=<tag>`` (server ``SetEnv``). Teardown
  uses it to find processes that escaped the session (``setsid``, double fork): they
  are descendants of our sshd even when re-parented to init.
* Network namespaces share the filesystem, the PID space and the hostname with the root
  namespace: only the network differs. ``socket.gethostname()`` is useless for telling
  hosts apart; a worker must report (and bind to) the address it was reached at.

Teardown never kills by name: it freezes (SIGSTOP) the sshd listener and its descendants
top-down so nothing can fork meanwhile, adds the tagged processes and, for a namespace,
``ip netns pids``, then sends SIGTERM + SIGCONT, and SIGKILL to whatever is left after a
grace period.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import ipaddress
import json
import os
import pwd
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, NoReturn, Self

import psutil

SSHD = "/usr/sbin/sshd"
"""sshd refuses to start unless run by an absolute path (it re-executes itself)."""

PRIVSEP_DIR = Path("/run/sshd")
"""Debian's sshd privilege-separation directory; must exist, owned by root."""

TAG_VAR = "DISTEXEC_SSHINFRA_TAG"
"""Environment variable that sshd sets in every session it starts (server ``SetEnv``)."""

NETNS_PREFIX = "dxtest-"
NETWORK_PREFIX = "198.18."
COMMAND_TIMEOUT = 10.0
"""Seconds allowed to any helper command (``ip``, ``ssh-keygen``)."""

REQUIRE_SSH = "DISTEXEC_REQUIRE_SSH"
"""Set to ``1`` (CI) to make a missing OpenSSH fail the SSH tests instead of skipping them."""

REQUIRE_NETNS = "DISTEXEC_REQUIRE_NETNS"
"""Set to ``1`` (CI) to make unavailable network namespaces fail the netns tests."""

_SUBPROCESS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class InfraUnavailable(RuntimeError):
    """This machine lacks something the SSH tests need: skip them (or fail, if required)."""


class SSHUnavailable(InfraUnavailable):
    """OpenSSH (``/usr/sbin/sshd``, ``ssh``, ``ssh-keygen``) is not installed."""


class NetnsUnavailable(InfraUnavailable):
    """Network namespaces, veths or bridges cannot be created (not root, no iproute2, ...)."""


class InfraError(RuntimeError):
    """The prerequisites exist but setting up or tearing down failed: a bug or a broken machine."""


def skip_or_fail(
    exc: InfraUnavailable, *require_vars: str, environ: Mapping[str, str] | None = None
) -> NoReturn:
    """Skip the current test with *exc*'s message, or fail it if one of *require_vars* is ``1``.

    *environ* defaults to ``os.environ``.
    """
    import pytest  # only here: the rest of this module does not need pytest

    env = os.environ if environ is None else environ
    required = [name for name in require_vars if env.get(name) == "1"]
    if required:
        pytest.fail(f"{exc} ({required[0]}=1 requires it)", pytrace=False)
    pytest.skip(str(exc))


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def run_command(
    argv: Sequence[str],
    *,
    timeout: float = COMMAND_TIMEOUT,
    input: bytes | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run *argv* to completion with a timeout, capturing its output.

    Raises:
        InfraError: *check* is true and the command exited non-zero, or it timed out.
    """
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise InfraError(f"{shlex.join(argv)} did not finish within {timeout} s") from exc
    except OSError as exc:
        raise InfraError(f"cannot run {shlex.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise InfraError(
            f"{shlex.join(argv)} exited with {proc.returncode}: {_text(proc.stderr).strip()}"
        )
    return proc


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.01,
) -> None:
    """Poll *condition* every *interval* seconds until it is true.

    Raises:
        TimeoutError: it was still false after *timeout* seconds; the message names *what*.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting until {what}")
        time.sleep(interval)


def port_accepts(host: str, port: int, *, timeout: float = 0.5) -> bool:
    """Return whether a TCP connection to *host*:*port* succeeds (it is closed at once)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on *host* that was free a moment ago (the caller must cope with races)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def shell_command(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """Quote *argv* into one remote shell command, prefixed with ``env K=V ...`` for *env*.

    ssh joins its command arguments with spaces and hands the result to ``$SHELL -c``, so a
    remote command must be one correctly quoted string.
    """
    prefix = ["env", *(f"{key}={value}" for key, value in env.items())] if env else []
    return shlex.join([*prefix, *argv])


def read_line(stream: IO[bytes], *, timeout: float) -> bytes:
    """Read one line (up to and including ``\\n``) from an unbuffered pipe, with a deadline.

    *stream* must be unbuffered (``Popen(..., bufsize=0)``) so that ``select`` sees every
    byte; nothing after the newline is consumed.

    Raises:
        TimeoutError: no complete line within *timeout* seconds.
        EOFError: the pipe closed first; the message holds what was read.
    """
    deadline = time.monotonic() + timeout
    line = bytearray()
    fd = stream.fileno()
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete line within {timeout} s (read so far: {line!r})")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            byte = os.read(fd, 1)
            if not byte:
                raise EOFError(f"pipe closed before a complete line (read so far: {line!r})")
            line += byte
    return bytes(line)


def current_user() -> str:
    """Return the name of the effective user (the one sshd must let in)."""
    return pwd.getpwuid(os.geteuid()).pw_name


def remote_python_env() -> dict[str, str]:
    """Return the environment a remote interpreter needs to import this ``distexec``.

    ``{"PYTHONPATH": <directory holding the distexec package the tests import>}``, or ``{}``
    when distexec cannot be found. Harmless after ``pip install -e .`` (same directory).
    """
    spec = importlib.util.find_spec("distexec")
    if spec is None:
        return {}
    if spec.submodule_search_locations:
        package_dir = Path(next(iter(spec.submodule_search_locations)))
    elif spec.origin is not None:
        package_dir = Path(spec.origin).parent
    else:
        return {}
    return {"PYTHONPATH": str(package_dir.resolve().parent)}


def known_hosts_name(host: str, port: int) -> str:
    """Return how ssh names *host*:*port* in ``known_hosts`` (``[host]:port`` unless port 22)."""
    return host if port == 22 else f"[{host}]:{port}"


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", "replace")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _require_openssh() -> None:
    missing = [
        name
        for name in (SSHD, "ssh", "ssh-keygen")
        if shutil.which(name, path=_SUBPROCESS_PATH) is None
    ]
    if missing:
        raise SSHUnavailable(
            f"OpenSSH unavailable: {', '.join(missing)} not found "
            "(apt-get install -y --no-install-recommends openssh-server openssh-client)"
        )


def _ensure_privsep_dir() -> None:
    try:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    except OSError as exc:
        raise SSHUnavailable(f"OpenSSH unavailable: cannot create {PRIVSEP_DIR}: {exc}") from exc


def _pdeathsig_prefix() -> list[str]:
    """Return ``setpriv --pdeathsig KILL --`` if available: sshd then dies with the test process.

    The parent-death signal fires when the *thread* that started sshd exits, so start
    servers from a thread that lives as long as they do (pytest's main thread).
    """
    setpriv = shutil.which("setpriv", path=_SUBPROCESS_PATH)
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


# --------------------------------------------------------------------------------------
# Process-tree teardown
# --------------------------------------------------------------------------------------


def _freeze_tree(root: psutil.Process, frozen: dict[int, psutil.Process]) -> None:
    """SIGSTOP *root* and its descendants top-down, so none can fork while we collect them."""
    stack = [root]
    while stack:
        proc = stack.pop()
        if proc.pid in frozen or proc.pid == os.getpid():
            continue
        try:
            proc.suspend()
            frozen[proc.pid] = proc
            stack.extend(proc.children())
        except psutil.Error:
            continue


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Return the live processes whose environment holds ``DISTEXEC_SSHINFRA_TAG=<tag>``."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(TAG_VAR) == tag:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def netns_pids(namespace: str, *, ip: str = "ip") -> list[int]:
    """Return the pids of every process whose network namespace is *namespace*."""
    proc = run_command([ip, "netns", "pids", namespace], check=False)
    return [int(word) for word in _text(proc.stdout).split() if word.isdigit()]


def _is_gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} ({shlex.join(proc.cmdline()) or proc.name()})"
    except psutil.Error:
        return f"pid {proc.pid}"


def _signal_all(procs: Sequence[psutil.Process], sig: signal.Signals) -> None:
    """Send *sig*, then SIGCONT (a frozen process acts on a signal only once continued)."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
            proc.resume()


def _wait_gone(
    procs: Sequence[psutil.Process], popen: subprocess.Popen[bytes] | None, deadline: float
) -> bool:
    while True:
        if popen is not None:
            popen.poll()  # reaps our own child as soon as it exits
        if all(_is_gone(proc) for proc in procs):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def _terminate(
    frozen: Mapping[int, psutil.Process],
    popen: subprocess.Popen[bytes] | None,
    *,
    grace: float,
) -> list[str]:
    """SIGTERM every process of *frozen*, SIGKILL survivors after *grace*; return what is left.

    *popen* (our direct child, if any) is reaped with ``Popen.wait`` so its status is kept.
    A zombie counts as gone: its parent (or init) reaps it.
    """
    procs = list(frozen.values())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        _signal_all([proc for proc in procs if not _is_gone(proc)], sig)
        if _wait_gone(procs, popen, time.monotonic() + grace):
            break
    survivors = [_describe(proc) for proc in procs if not _is_gone(proc)]
    if popen is not None:
        try:
            popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            popen.kill()
            survivors.append(f"pid {popen.pid} (our sshd child)")
    return survivors


# --------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SSHKeys:
    """Keys shared by every test server: one host key, a registered and an unregistered user key."""

    directory: Path
    host_key: Path
    host_public_key: str
    """``"ssh-ed25519 AAAA..."``: the pinned host key, as written to known_hosts."""
    user_key: Path
    """Private key listed in :attr:`authorized_keys`; what the fixtures authenticate with."""
    authorized_keys: Path
    wrong_key: Path
    """A valid key that no server accepts, for "Permission denied" tests."""

    @classmethod
    def generate(cls, directory: Path, *, timeout: float = COMMAND_TIMEOUT) -> SSHKeys:
        """Create *directory* and three ed25519 key pairs (``ssh-keygen -q -N ""``) in it.

        Raises:
            SSHUnavailable: ``ssh-keygen`` is not installed.
        """
        keygen = shutil.which("ssh-keygen", path=_SUBPROCESS_PATH)
        if keygen is None:
            raise SSHUnavailable(
                "OpenSSH unavailable: ssh-keygen not found (apt-get install -y openssh-client)"
            )
        directory.mkdir(parents=True, exist_ok=True)
        paths = {name: directory / name for name in ("host_key", "user_key", "wrong_key")}
        for name, path in paths.items():
            run_command(
                [
                    keygen,
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    f"distexec-test-{name}",
                    "-f",
                    str(path),
                ],
                timeout=timeout,
            )
        authorized_keys = directory / "authorized_keys"
        authorized_keys.write_text(paths["user_key"].with_suffix(".pub").read_text())
        authorized_keys.chmod(0o600)
        host_public = paths["host_key"].with_suffix(".pub").read_text().split()
        return cls(
            directory=directory,
            host_key=paths["host_key"],
            host_public_key=" ".join(host_public[:2]),
            user_key=paths["user_key"],
            authorized_keys=authorized_keys,
            wrong_key=paths["wrong_key"],
        )


@dataclasses.dataclass(frozen=True, slots=True)
class HostEntry:
    """One ``Host`` block of a client config: *alias* means *user*@*hostname*:*port*."""

    alias: str
    hostname: str
    port: int
    user: str


def write_client_files(
    directory: Path, keys: SSHKeys, entries: Sequence[HostEntry]
) -> tuple[Path, Path]:
    """Write ``ssh_config`` and ``known_hosts`` for *entries* into *directory*; return both paths.

    ``Host *`` carries the defaults, so an address used directly (``root@127.0.0.1 -p N``,
    what SSHManager does with ``"user@host:port"``) gets the same key, pinned host key and
    batch mode as the aliases. ``KexAlgorithms`` skips the default post-quantum hybrid
    (sntrup761), which costs ~0.13 s per connection on a 2-CPU VM.
    """
    known_hosts = directory / "known_hosts"
    lines = []
    for e in entries:
        names = [e.hostname, "localhost"] if e.hostname == "127.0.0.1" else [e.hostname]
        pattern = ",".join(known_hosts_name(name, e.port) for name in names)
        lines.append(f"{pattern} {keys.host_public_key}\n")
    known_hosts.write_text("".join(lines))
    blocks = [
        f"Host {e.alias}\n    HostName {e.hostname}\n    Port {e.port}\n    User {e.user}\n"
        for e in entries
    ]
    defaults = f"""Host *
    IdentityFile {keys.user_key}
    IdentitiesOnly yes
    IdentityAgent none
    PasswordAuthentication no
    KbdInteractiveAuthentication no
    UserKnownHostsFile {known_hosts}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    UpdateHostKeys no
    CheckHostIP no
    BatchMode yes
    ConnectTimeout 5
    ConnectionAttempts 1
    ControlMaster no
    ControlPath none
    ForwardAgent no
    ForwardX11 no
    ExitOnForwardFailure yes
    KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org
    LogLevel ERROR
"""
    config = directory / "ssh_config"
    config.write_text(
        "# Written by tests/sshinfra.py; use with ssh -F.\n" + "\n".join([*blocks, defaults])
    )
    return config, known_hosts


# --------------------------------------------------------------------------------------
# One sshd
# --------------------------------------------------------------------------------------


class SSHServer:
    """One real OpenSSH daemon started by the tests, key authentication only.

    A context manager; :meth:`close` is idempotent and also stops every session process
    the daemon started (see the module docstring). Attributes are valid once started.

    Args:
        keys: host and user keys (shared between servers).
        workdir: a directory owned by this server (config, pid file, log, client files).
        host: address to listen on; ``127.0.0.1`` or a namespace's address.
        port: port to listen on; default a free port, or 22 inside a namespace.
        netns: run sshd inside this network namespace (``ip netns exec``).
        alias: ``Host`` alias in the client config.
        server_env: extra ``SetEnv`` variables for every session (default none; prefer
            exporting variables in the remote command, as SSHManager's ``env=`` does).
        start_timeout: seconds allowed for sshd to listen and accept.
        ip: the iproute2 ``ip`` command (used with *netns*).
    """

    def __init__(
        self,
        keys: SSHKeys,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        netns: str | None = None,
        alias: str = "dxhost",
        server_env: Mapping[str, str] | None = None,
        start_timeout: float = 10.0,
        ip: str = "ip",
    ) -> None:
        self.keys = keys
        self.workdir = workdir
        self.host = host
        self.netns = netns
        self.alias = alias
        self.user = current_user()
        self.tag = f"{alias}-{secrets.token_hex(6)}"
        self.python = sys.executable
        """Absolute path of this interpreter; the same file exists on every test "host"."""
        self.remote_env = remote_python_env()
        """Variables a remote ``python -m distexec.worker`` needs (``PYTHONPATH``)."""
        self._port_auto = port is None and netns is None
        self._port = port if port is not None else 22
        self._server_env = dict(server_env or {})
        self._start_timeout = start_timeout
        self._ip = ip
        self._popen: subprocess.Popen[bytes] | None = None
        self._state = "new"
        self.sshd_config = workdir / "sshd_config"
        self.log_path = workdir / "sshd.log"
        self.ssh_config = workdir / "ssh_config"
        self.known_hosts = workdir / "known_hosts"

    # -- public surface ----------------------------------------------------------------

    @property
    def port(self) -> int:
        """TCP port sshd listens on."""
        return self._port

    @property
    def identity_file(self) -> Path:
        """Private key that the server accepts."""
        return self.keys.user_key

    @property
    def sshflags(self) -> tuple[str, ...]:
        """Options for ``ssh`` (``addprocs(..., sshflags=...)``): ``("-F", ssh_config)``."""
        return ("-F", str(self.ssh_config))

    @property
    def destination(self) -> str:
        """The machine spec ``"user@host:port"`` for ``addprocs``."""
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Pid of the sshd listener (our child), or None when not running."""
        return self._popen.pid if self._popen is not None and self._state == "running" else None

    @property
    def state(self) -> str:
        """``new``, ``running`` or ``closed``."""
        return self._state

    def __repr__(self) -> str:
        where = f" netns={self.netns}" if self.netns else ""
        return (
            f"<SSHServer state={self._state} addr={self.host}:{self._port} pid={self.pid}{where}>"
        )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> Self:
        """Write the configs, start sshd and wait until it accepts connections.

        Raises:
            SSHUnavailable: OpenSSH is not installed.
            InfraError: sshd exited or did not accept connections in time (log included).
        """
        if self._state != "new":
            raise InfraError(f"{self!r} cannot start twice")
        try:
            for attempt in range(3 if self._port_auto else 1):
                self._launch()
                try:
                    self._await_ready(time.monotonic() + self._start_timeout)
                    break
                except _PortTaken:
                    self._stop(grace=1.0)
                    self._state = "new"
                    if attempt == 2:
                        raise
            write_client_files(
                self.workdir, self.keys, [HostEntry(self.alias, self.host, self._port, self.user)]
            )
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop sshd and every process it started; idempotent.

        Raises:
            InfraError: some process survived SIGKILL (named in the message).
        """
        if self._state == "closed":
            return
        survivors = self._stop(grace=2.0)
        self._state = "closed"
        if survivors:
            raise InfraError(f"{self!r}: processes survived teardown: {', '.join(survivors)}")

    def processes(self) -> list[psutil.Process]:
        """Return this server's live processes: listener, sessions, escaped session children."""
        found: dict[int, psutil.Process] = {}
        if self._popen is not None and self._popen.poll() is None:
            try:
                listener = psutil.Process(self._popen.pid)
                found[listener.pid] = listener
                found.update((p.pid, p) for p in listener.children(recursive=True))
            except psutil.Error:
                pass
        found.update((p.pid, p) for p in tagged_processes(self.tag))
        if self.netns is not None:
            for pid in netns_pids(self.netns, ip=self._ip):
                try:
                    found.setdefault(pid, psutil.Process(pid))
                except psutil.Error:
                    continue
        return [p for p in found.values() if not _is_gone(p)]

    def ssh_argv(self, command: str, *options: str, destination: str | None = None) -> list[str]:
        """Return ``ssh -F cfg [options] -- <alias> <command>`` as an argv list."""
        return ["ssh", *self.sshflags, *options, "--", destination or self.alias, command]

    def run(
        self,
        command: str,
        *options: str,
        input: bytes | None = None,
        timeout: float = 30.0,
        destination: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run *command* (one shell string) over ssh, wait and capture; never raises on exit code.

        ssh gets its own session (no controlling terminal), so nothing can prompt.
        """
        return subprocess.run(
            self.ssh_argv(command, *options, destination=destination),
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            timeout=timeout,
            check=False,
            start_new_session=True,
        )

    def log_tail(self, lines: int = 30) -> str:
        """Return the last *lines* lines of sshd's log (``LogLevel VERBOSE``)."""
        return _tail(self.log_path, lines)

    # -- internals ---------------------------------------------------------------------

    def _write_sshd_config(self) -> None:
        set_env = {TAG_VAR: self.tag, **self._server_env}
        set_env_line = " ".join(f"{key}={value}" for key, value in set_env.items())
        self.sshd_config.write_text(
            f"""# Written by tests/sshinfra.py; every path is under {self.workdir}.
ListenAddress {self.host}
Port {self._port}
AddressFamily inet
HostKey {self.keys.host_key}
PidFile {self.workdir / "sshd.pid"}
AuthorizedKeysFile {self.keys.authorized_keys}
AllowUsers {self.user}
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
PermitRootLogin prohibit-password
PermitEmptyPasswords no
PermitUserEnvironment no
StrictModes no
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowAgentForwarding no
AllowTcpForwarding yes
GatewayPorts no
PermitTunnel no
MaxStartups 100:30:200
MaxSessions 100
LoginGraceTime 30
LogLevel VERBOSE
AcceptEnv LANG LC_* DISTEXEC_*
SetEnv {set_env_line}
"""
        )

    def _launch(self) -> None:
        """Write the config and start sshd in the background (see :meth:`_await_ready`)."""
        _require_openssh()
        _ensure_privsep_dir()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._port_auto:
            self._port = free_port(self.host)
        self._write_sshd_config()
        self.log_path.write_bytes(b"")
        argv = [SSHD, "-D", "-f", str(self.sshd_config), "-E", str(self.log_path)]
        if self.netns is not None:
            argv = [self._ip, "netns", "exec", self.netns, *argv]
        with open(self.workdir / "sshd.stderr", "ab") as stderr:
            self._popen = subprocess.Popen(
                [*_pdeathsig_prefix(), *argv],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                env={"PATH": _SUBPROCESS_PATH},
                start_new_session=True,
            )
        self._state = "running"

    def _await_ready(self, deadline: float) -> None:
        """Wait until sshd logged that it listens and a TCP connection to it succeeds."""
        assert self._popen is not None
        banner = f"Server listening on {self.host} port {self._port}."
        while True:
            if self._popen.poll() is not None:
                log = self.log_tail()
                if self._port_auto and "Address already in use" in log:
                    raise _PortTaken(log)
                raise InfraError(
                    f"sshd for {self.host}:{self._port} exited with {self._popen.returncode} "
                    f"while starting; {self.log_path}:\n{log}\n"
                    f"{_tail(self.workdir / 'sshd.stderr')}"
                )
            if banner in _tail(self.log_path, 200) and port_accepts(self.host, self._port):
                return
            if time.monotonic() >= deadline:
                raise InfraError(
                    f"sshd for {self.host}:{self._port} did not accept connections in time; "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.01)

    def _stop(self, *, grace: float) -> list[str]:
        frozen: dict[int, psutil.Process] = {}
        popen = self._popen
        if popen is not None and popen.poll() is None:
            with contextlib.suppress(psutil.Error):
                _freeze_tree(psutil.Process(popen.pid), frozen)
        for proc in tagged_processes(self.tag):
            _freeze_tree(proc, frozen)
        if self.netns is not None:
            for pid in netns_pids(self.netns, ip=self._ip):
                try:
                    _freeze_tree(psutil.Process(pid), frozen)
                except psutil.Error:
                    continue
        survivors = _terminate(frozen, popen, grace=grace)
        self._popen = None
        return survivors


class _PortTaken(InfraError):
    """The automatically chosen port was taken before sshd could bind it; try another."""


# --------------------------------------------------------------------------------------
# Network namespaces as hosts
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class NetnsHost:
    """One test "host": a network namespace with its own address and sshd."""

    name: str
    """Network namespace name, ``dxtest-<tag>-<letter>``."""
    addr: str
    """The host's IPv4 address (198.18.K.2+i), reachable from the root namespace and all hosts."""
    port: int
    """sshd's port (22)."""
    ssh_alias: str
    """``Host`` alias in :attr:`NetnsHosts.ssh_config`, ``dxhost-<letter>``."""
    user: str
    server: SSHServer

    @property
    def destination(self) -> str:
        """The machine spec ``"user@addr:port"`` for ``addprocs``."""
        return f"{self.user}@{self.addr}:{self.port}"

    def exec_argv(self, *argv: str) -> list[str]:
        """Return ``ip netns exec <name> argv...``: run a command inside this host, without ssh."""
        return ["ip", "netns", "exec", self.name, *argv]


class NetnsHosts:
    """*count* network namespaces on one bridge, each running its own sshd (same keys).

    Addresses are 198.18.K.0/24 with K random and unused on this machine: the bridge
    (root namespace, the master) has ``.1``, host *i* has ``.2+i``. A context manager;
    :meth:`close` is idempotent and deletes whatever was created, even after a failed start.

    Raises (from :meth:`start`):
        NetnsUnavailable: namespaces, veths or bridges cannot be created here.
        SSHUnavailable: OpenSSH is not installed.
        InfraError: anything else failed.
    """

    def __init__(
        self,
        keys: SSHKeys,
        workdir: Path,
        *,
        count: int = 2,
        tag: str | None = None,
        ip: str = "ip",
        start_timeout: float = 10.0,
    ) -> None:
        if not 1 <= count <= 26:
            raise ValueError(f"count must be 1..26, not {count}")
        self.keys = keys
        self.workdir = workdir
        self.count = count
        self.tag = tag or secrets.token_hex(3)
        self.user = current_user()
        self.python = sys.executable
        """Absolute path of this interpreter; the same file exists on every host."""
        self.remote_env = remote_python_env()
        """Variables a remote ``python -m distexec.worker`` needs (``PYTHONPATH``)."""
        self.bridge = f"dxbr-{self.tag}"
        self.network: ipaddress.IPv4Network | None = None
        self.root_addr: str | None = None
        """The root namespace's (the master's) address on the bridge."""
        self.hosts: tuple[NetnsHost, ...] = ()
        self.ssh_config = workdir / "ssh_config"
        self.known_hosts = workdir / "known_hosts"
        self._ip = ip
        self._start_timeout = start_timeout
        self._namespaces: list[str] = []
        self._veths: list[str] = []
        self._bridge_created = False
        self._servers: list[SSHServer] = []
        self._state = "new"

    @property
    def sshflags(self) -> tuple[str, ...]:
        """Options for ``ssh``: ``("-F", ssh_config)``, a config naming every host."""
        return ("-F", str(self.ssh_config))

    @property
    def state(self) -> str:
        """``new``, ``running`` or ``closed``."""
        return self._state

    def __repr__(self) -> str:
        names = ",".join(h.name for h in self.hosts) or "-"
        return f"<NetnsHosts state={self._state} network={self.network} hosts={names}>"

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self) -> Iterator[NetnsHost]:
        return iter(self.hosts)

    def __getitem__(self, index: int) -> NetnsHost:
        return self.hosts[index]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def ssh_argv(self, host: NetnsHost, command: str, *options: str) -> list[str]:
        """Return ``ssh -F cfg [options] -- <alias> <command>`` for *host*."""
        return ["ssh", *self.sshflags, *options, "--", host.ssh_alias, command]

    def run(
        self,
        host: NetnsHost,
        command: str,
        *options: str,
        input: bytes | None = None,
        timeout: float = 30.0,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run *command* on *host* over ssh; see :meth:`SSHServer.run`."""
        return subprocess.run(
            self.ssh_argv(host, command, *options),
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            timeout=timeout,
            check=False,
            start_new_session=True,
        )

    def start(self) -> Self:
        """Create the namespaces, the bridge and the veths, then start one sshd per host."""
        if self._state != "new":
            raise InfraError(f"{self!r} cannot start twice")
        self._state = "running"
        try:
            self._create_network()
            self._start_servers()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop the sshds (and every process in our namespaces), delete veths, namespaces, bridge.

        Idempotent; tries every step even when one fails.

        Raises:
            InfraError: something could not be removed (all problems in one message).
        """
        if self._state == "closed":
            return
        self._state = "closed"
        problems: list[str] = []
        for server in self._servers:
            try:
                server.close()
            except InfraError as exc:
                problems.append(str(exc))
        for veth in self._veths:
            proc = run_command([self._ip, "link", "del", veth], check=False)
            if proc.returncode != 0 and self._link_exists(veth):
                problems.append(f"ip link del {veth}: {_text(proc.stderr).strip()}")
        for name in self._namespaces:
            for pid in netns_pids(name, ip=self._ip):  # anything the servers did not own
                try:
                    frozen: dict[int, psutil.Process] = {}
                    _freeze_tree(psutil.Process(pid), frozen)
                    problems.extend(_terminate(frozen, None, grace=2.0))
                except psutil.Error:
                    continue
            proc = run_command([self._ip, "netns", "del", name], check=False)
            if proc.returncode != 0 and name in self._existing_namespaces():
                problems.append(f"ip netns del {name}: {_text(proc.stderr).strip()}")
        if self._bridge_created:
            proc = run_command([self._ip, "link", "del", self.bridge], check=False)
            if proc.returncode != 0 and self._link_exists(self.bridge):
                problems.append(f"ip link del {self.bridge}: {_text(proc.stderr).strip()}")
        if problems:
            raise InfraError(f"{self!r}: teardown left things behind: " + "; ".join(problems))

    # -- internals ---------------------------------------------------------------------

    def _step(self, argv: Sequence[str], what: str) -> None:
        proc = run_command([self._ip, *argv], check=False)
        if proc.returncode != 0:
            raise NetnsUnavailable(
                f"network namespaces unavailable: {what}: {_text(proc.stderr).strip()}"
            )

    def _link_exists(self, name: str) -> bool:
        return run_command([self._ip, "link", "show", "dev", name], check=False).returncode == 0

    def _existing_namespaces(self) -> set[str]:
        proc = run_command([self._ip, "netns", "list"], check=False)
        return {line.split()[0] for line in _text(proc.stdout).splitlines() if line.strip()}

    def _used_networks(self) -> list[ipaddress.IPv4Network]:
        """IPv4 networks already present on this machine's root namespace (routes and addresses)."""
        used = []
        routes = json.loads(
            _text(run_command([self._ip, "-j", "-4", "route", "show", "table", "all"]).stdout)
            or "[]"
        )
        for route in routes:
            try:
                used.append(ipaddress.IPv4Network(route.get("dst", ""), strict=False))
            except ValueError:  # "default", "multicast", ...
                continue
        addrs = json.loads(
            _text(run_command([self._ip, "-j", "-4", "addr", "show"]).stdout) or "[]"
        )
        for link in addrs:
            for info in link.get("addr_info", []):
                used.append(
                    ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
                )
        return used

    def _pick_network(self) -> ipaddress.IPv4Network:
        used = self._used_networks()
        for _ in range(50):
            candidate = ipaddress.IPv4Network(f"{NETWORK_PREFIX}{secrets.randbelow(254) + 1}.0/24")
            if not any(candidate.overlaps(net) for net in used):
                return candidate
        raise InfraError("no free 198.18.K.0/24 network found for the namespace hosts")

    def _create_network(self) -> None:
        if shutil.which(self._ip) is None:
            raise NetnsUnavailable(
                f"network namespaces unavailable: iproute2 not installed ({self._ip!r} not found)"
            )
        names = [f"{NETNS_PREFIX}{self.tag}-{chr(ord('a') + i)}" for i in range(self.count)]
        for name in names:
            self._step(["netns", "add", name], f"ip netns add {name}")
            self._namespaces.append(name)
        self._step(
            ["link", "add", self.bridge, "type", "bridge", "forward_delay", "0", "stp_state", "0"],
            f"ip link add {self.bridge} type bridge",
        )
        self._bridge_created = True
        self.network = self._pick_network()
        hosts = list(self.network.hosts())
        self.root_addr = str(hosts[0])
        prefix = self.network.prefixlen
        self._step(["addr", "add", f"{self.root_addr}/{prefix}", "dev", self.bridge], "ip addr add")
        self._step(["link", "set", self.bridge, "up"], f"ip link set {self.bridge} up")
        addrs = []
        for i, name in enumerate(names):
            veth = f"dxv-{self.tag}-{chr(ord('a') + i)}"
            self._step(
                ["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name],
                f"ip link add {veth} type veth",
            )
            self._veths.append(veth)
            addr = str(hosts[1 + i])
            addrs.append(addr)
            self._step(["link", "set", veth, "master", self.bridge], f"ip link set {veth} master")
            self._step(["link", "set", veth, "up"], f"ip link set {veth} up")
            self._step(["-n", name, "link", "set", "lo", "up"], f"ip -n {name} link set lo up")
            self._step(
                ["-n", name, "addr", "add", f"{addr}/{prefix}", "dev", "eth0"],
                f"ip -n {name} addr add",
            )
            self._step(["-n", name, "link", "set", "eth0", "up"], f"ip -n {name} link set eth0 up")
        self._check_network_is_ours()
        self.hosts = tuple(
            NetnsHost(
                name=name,
                addr=addr,
                port=22,
                ssh_alias=f"dxhost-{chr(ord('a') + i)}",
                user=self.user,
                server=SSHServer(
                    self.keys,
                    self.workdir / name,
                    host=addr,
                    port=22,
                    netns=name,
                    alias=f"dxhost-{chr(ord('a') + i)}",
                    ip=self._ip,
                ),
            )
            for i, (name, addr) in enumerate(zip(names, addrs, strict=True))
        )

    def _check_network_is_ours(self) -> None:
        """After claiming the network, make sure no other interface has a route into it.

        Guards against two test sessions (pytest-xdist) picking the same K at once.
        """
        assert self.network is not None
        routes = json.loads(
            _text(
                run_command(
                    [self._ip, "-j", "-4", "route", "show", "to", "match", str(self.network)]
                ).stdout
            )
            or "[]"
        )
        others = [
            r
            for r in routes
            if r.get("dev") not in (self.bridge, None) and r.get("dst") != "default"
        ]
        if others:
            raise InfraError(f"network {self.network} is also routed via {others}; retry")

    def _start_servers(self) -> None:
        self._servers = [host.server for host in self.hosts]
        deadline = time.monotonic() + self._start_timeout
        for server in self._servers:  # launch all, then wait: sshds start in parallel
            server._launch()
        for server in self._servers:
            server._await_ready(deadline)
        for host in self.hosts:
            write_client_files(
                host.server.workdir,
                self.keys,
                [HostEntry(host.ssh_alias, host.addr, host.port, host.user)],
            )
        write_client_files(
            self.workdir,
            self.keys,
            [HostEntry(h.ssh_alias, h.addr, h.port, h.user) for h in self.hosts],
        )


def addprocs_kwargs(server: SSHServer | NetnsHosts, **extra: Any) -> dict[str, Any]:
    """What ``addprocs`` needs to start workers through *server*: its ssh flags, the
    remote interpreter and environment, plus *extra*."""
    return {
        "sshflags": server.sshflags,
        "exename": server.python,
        "env": server.remote_env,
        **extra,
    }


def ssh_client_children() -> list[psutil.Process]:
    """This process's ssh clients (and zombies) still around."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE or child.name() == "ssh":
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out

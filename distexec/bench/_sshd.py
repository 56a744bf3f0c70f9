"""A throwaway OpenSSH server for the SSH cases: on 127.0.0.1, or in a network namespace.

Layer: tooling (``python -m distexec.bench``). Imports: stdlib and the bench's own modules.

``SSHD(workdir)`` generates an ed25519 host key and user key with ``ssh-keygen`` and runs
``/usr/sbin/sshd -D -e -f <config>`` on ``127.0.0.1:<free port>``, key authentication only,
for the current user. ``SSHD(workdir, netns=True)`` first makes a network namespace
``dxbench-<pid>-<hex>`` joined to this one by a veth pair with a /30 from 198.19.0.0/16
(RFC 2544 benchmarking space: this end ``.1``, the namespace ``.2``; no default route, no
forwarding), and runs sshd inside it on ``.2:22`` with ``ip netns exec``. Either way
:attr:`SSHD.sshflags` (``-F <client config>``: the user key, the pinned host key in a
known_hosts of its own, batch mode), :attr:`SSHD.destination`, and :meth:`SSHD.addprocs_kw`
are what ``addprocs([destination], ...)`` needs.

Cleanup (:meth:`SSHD.close`, idempotent) ends, by pid, the sshd it started, that sshd's
descendants and, for a namespace, whatever runs in it; then deletes the namespace (which
takes the veth pair with it). sshd gets ``setpriv --pdeathsig KILL`` where available, so it
dies with the driver even when the driver is killed; a namespace left by a killed driver is
deleted by the next ``SSHD(netns=True)`` (its name carries the dead driver's pid).

A machine without OpenSSH, or where namespaces cannot be made (not root, no iproute2),
raises ``BenchUnavailable`` whose message starts ``OpenSSH unavailable:`` or
``network namespaces unavailable:``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from distexec.bench import _procs
from distexec.bench._backends import BenchUnavailable

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Debian's privilege-separation directory: sshd refuses to start without it.
PRIVSEP_DIR = Path("/run/sshd")
NETNS_PREFIX = "dxbench-"
#: Where the /30 links come from: 198.19.0.0/16, the half of RFC 2544's 198.18.0.0/15 that
#: the test suite's namespace hosts (198.18.K.0/24) do not use.
NETWORK = ipaddress.IPv4Network("198.19.0.0/16")
#: Seconds allowed to a helper command (``ip``, ``ssh-keygen``, the check over ssh).
COMMAND_TIMEOUT = 20.0
#: Seconds sshd gets to accept connections.
START_TIMEOUT = 10.0


def _run(
    argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={"PATH": _PATH},
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{shlex.join(argv)} did not finish within {timeout:g} s") from None


def _which(name: str) -> str:
    path = shutil.which(name, path=_PATH)
    if path is None:
        raise BenchUnavailable(
            f"OpenSSH unavailable: {name} not found (apt-get install openssh-server openssh-client)"
        )
    return path


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def remote_env() -> dict[str, str]:
    """``PYTHONPATH`` naming the directory of the ``distexec`` this process runs (same files)."""
    import distexec

    return {"PYTHONPATH": str(Path(distexec.__file__).resolve().parents[1])}


class SSHD:
    """One sshd started for one measurement; a context manager. See the module docstring."""

    def __init__(self, workdir: Path, *, netns: bool = False) -> None:
        self.workdir = workdir
        self.netns: str | None = None
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.host = "127.0.0.1"
        self.port = 0
        self._want_netns = netns
        self._veth: str | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._log = workdir / "sshd.log"
        self._client_config = workdir / "ssh_config"
        self._closed = False

    # -- what addprocs needs ------------------------------------------------------------

    @property
    def destination(self) -> str:
        """``user@host:port``, a machine spec for ``addprocs``."""
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def sshflags(self) -> tuple[str, ...]:
        """``("-F", client config)``: user key, pinned host key, batch mode, no prompts."""
        return ("-F", str(self._client_config))

    @property
    def pid(self) -> int | None:
        """The sshd listener's pid, while it runs."""
        return self._popen.pid if self._popen is not None else None

    def addprocs_kw(self, env: dict[str, str] | None = None) -> dict[str, Any]:
        """``sshflags``, this interpreter as ``exename``, and ``env`` with ``PYTHONPATH``."""
        return {
            "sshflags": self.sshflags,
            "exename": sys.executable,
            "env": {**remote_env(), **(env or {})},
        }

    # -- life cycle ---------------------------------------------------------------------

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
        """Keys, (namespace,) sshd, client config; raises ``BenchUnavailable`` if impossible."""
        sshd = _which("sshd")
        _which("ssh")
        keygen = _which("ssh-keygen")
        if os.geteuid() == 0:
            try:
                PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
            except OSError as exc:
                raise BenchUnavailable(
                    f"OpenSSH unavailable: cannot create {PRIVSEP_DIR}: {exc}"
                ) from None
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            host_pub = self._keys(keygen)
            if self._want_netns:
                self._make_netns()
            else:
                self.port = _free_port(self.host)
            self._launch(sshd)
            self._write_client_config(host_pub)
        except BaseException:
            self.close()
            raise
        return self

    def check(self) -> None:
        """Log in once (``ssh ... true``): the server lets us in. Not part of any timing."""
        ssh = _which("ssh")
        argv = [ssh, *self.sshflags, "-p", str(self.port), "--", f"{self.user}@{self.host}"]
        proc = _run([*argv, "true"])
        if proc.returncode != 0:
            raise RuntimeError(
                f"ssh to {self.destination} failed ({proc.returncode}): {proc.stderr.strip()}; "
                f"sshd log: {self._log_tail()}"
            )

    def time_logins(self, n: int) -> float:
        """Milliseconds until *n* concurrent ``ssh ... true`` sessions all returned: what ssh
        itself costs *n* workers started one connection each (login, remote shell start-up);
        with *n* = 1, the set-up of the one connection a multiplexing SSHManager makes."""
        ssh = _which("ssh")
        argv = [ssh, *self.sshflags, "-p", str(self.port), "--", f"{self.user}@{self.host}"]
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen([*argv, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            for _ in range(n)
        ]
        codes = [p.wait(timeout=COMMAND_TIMEOUT) for p in procs]
        elapsed = (time.perf_counter() - t0) * 1e3
        if any(codes):
            raise RuntimeError(f"ssh ... true exited with {codes}: {self._log_tail()}")
        return elapsed

    def close(self) -> None:
        """End what this server started, by pid; delete the namespace. Idempotent."""
        if self._closed:
            return
        self._closed = True
        pids: list[int] = []
        if self._popen is not None:
            pids += [self._popen.pid, *_procs.descendants(self._popen.pid)]
        if self.netns is not None:
            pids += [p for p in self._netns_pids(self.netns) if p not in pids]
        if pids:
            self._end(pids)
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=2)
            self._popen = None
        if self.netns is not None:
            _run(["ip", "netns", "del", self.netns])
        if self._veth is not None:  # gone with the namespace, normally
            _run(["ip", "link", "del", self._veth])

    # -- internals ----------------------------------------------------------------------

    def _keys(self, keygen: str) -> str:
        for name in ("host_key", "user_key"):
            path = self.workdir / name
            proc = _run(
                [keygen, "-q", "-t", "ed25519", "-N", "", "-C", f"dxbench-{name}", "-f", str(path)]
            )
            if proc.returncode != 0:
                raise RuntimeError(f"ssh-keygen failed: {proc.stderr.strip()}")
        auth = self.workdir / "authorized_keys"
        auth.write_text((self.workdir / "user_key.pub").read_text())
        auth.chmod(0o600)
        return " ".join((self.workdir / "host_key.pub").read_text().split()[:2])

    def _make_netns(self) -> None:
        if shutil.which("ip", path=_PATH) is None:
            raise BenchUnavailable("network namespaces unavailable: iproute2 (ip) not installed")
        self._sweep_stale()
        tag = secrets.token_hex(3)
        name = f"{NETNS_PREFIX}{os.getpid()}-{tag}"
        self._step(["ip", "netns", "add", name])
        self.netns = name
        link = self._pick_link()
        here, there = (str(a) for a in list(link.hosts())[:2])
        self._veth = f"dxb-{tag}"
        self._step(
            ["ip", "link", "add", self._veth, "type", "veth", "peer", "name", "eth0", "netns", name]
        )
        prefix = link.prefixlen
        self._step(["ip", "addr", "add", f"{here}/{prefix}", "dev", self._veth])
        self._step(["ip", "link", "set", self._veth, "up"])
        self._step(["ip", "-n", name, "link", "set", "lo", "up"])
        self._step(["ip", "-n", name, "addr", "add", f"{there}/{prefix}", "dev", "eth0"])
        self._step(["ip", "-n", name, "link", "set", "eth0", "up"])
        # Someone else may have claimed the same /30 meanwhile: then its route is not ours.
        routes = json.loads(
            _run(["ip", "-j", "-4", "route", "show", "to", "match", there]).stdout or "[]"
        )
        others = [
            r
            for r in routes
            if r.get("dev") not in (self._veth, None) and r.get("dst") != "default"
        ]
        if others:
            raise RuntimeError(f"{link} is also routed via {others}")
        self.host, self.port = there, 22

    def _step(self, argv: list[str]) -> None:
        proc = _run(argv)
        if proc.returncode != 0:
            raise BenchUnavailable(
                f"network namespaces unavailable: {shlex.join(argv)}: {proc.stderr.strip()}"
            )

    @staticmethod
    def _netns_pids(name: str) -> list[int]:
        return [int(w) for w in _run(["ip", "netns", "pids", name]).stdout.split() if w.isdigit()]

    def _sweep_stale(self) -> None:
        """Delete empty ``dxbench-<pid>-*`` namespaces whose driver (pid) is gone."""
        listing = _run(["ip", "netns", "list"]).stdout.splitlines()
        for line in listing:
            name = line.split()[0] if line.strip() else ""
            m = re.fullmatch(rf"{NETNS_PREFIX}(\d+)-[0-9a-f]+", name)
            if m and not _procs.is_alive(int(m.group(1))) and not self._netns_pids(name):
                _run(["ip", "netns", "del", name])

    def _pick_link(self) -> ipaddress.IPv4Network:
        used: list[ipaddress.IPv4Network] = []
        for route in json.loads(
            _run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]"
        ):
            with contextlib.suppress(ValueError):
                used.append(ipaddress.IPv4Network(route.get("dst", ""), strict=False))
        for link in json.loads(_run(["ip", "-j", "-4", "addr", "show"]).stdout or "[]"):
            for a in link.get("addr_info", []):
                used.append(ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False))
        nlinks = NETWORK.num_addresses // 4
        for _ in range(100):
            k = secrets.randbelow(nlinks)
            cand = ipaddress.IPv4Network((int(NETWORK.network_address) + 4 * k, 30))
            if not any(cand.overlaps(u) for u in used):
                return cand
        raise RuntimeError(f"no free /30 in {NETWORK} for the namespace link")

    def _launch(self, sshd: str) -> None:
        config = self.workdir / "sshd_config"
        config.write_text(
            f"""# Written by distexec.bench for one measurement; paths under {self.workdir}.
ListenAddress {self.host}
Port {self.port}
AddressFamily inet
HostKey {self.workdir / "host_key"}
PidFile none
AuthorizedKeysFile {self.workdir / "authorized_keys"}
AllowUsers {self.user}
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
PermitUserEnvironment no
StrictModes no
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowAgentForwarding no
AllowTcpForwarding yes
MaxStartups 100:30:200
MaxSessions 100
LogLevel VERBOSE
"""
        )
        argv = [sshd, "-D", "-e", "-f", str(config)]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        setpriv = shutil.which("setpriv", path=_PATH)
        if setpriv:
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        # The run's marker variable lets the orchestrator find sshd should this driver die.
        env = {"PATH": _PATH}
        env.update((k, v) for k, v in os.environ.items() if k == "DISTEXEC_BENCH_RUN")
        with self._log.open("ab") as log:
            self._popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not _port_accepts(self.host, self.port):
            if self._popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"sshd on {self.host}:{self.port} "
                    + (
                        f"exited with {self._popen.returncode}"
                        if self._popen.returncode is not None
                        else f"did not accept connections within {START_TIMEOUT:g} s"
                    )
                    + f": {self._log_tail()}"
                )
            time.sleep(0.01)

    def _write_client_config(self, host_pub: str) -> None:
        known = self.workdir / "known_hosts"
        name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        known.write_text(f"{name} {host_pub}\n")
        # curve25519 key exchange: OpenSSH 9.x's default post-quantum hybrid costs ~0.1 s of
        # CPU per connection, which is ssh set-up, not what the case compares.
        self._client_config.write_text(
            f"""# Written by distexec.bench; use with ssh -F.
Host *
    User {self.user}
    IdentityFile {self.workdir / "user_key"}
    IdentitiesOnly yes
    IdentityAgent none
    PasswordAuthentication no
    KbdInteractiveAuthentication no
    UserKnownHostsFile {known}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    UpdateHostKeys no
    CheckHostIP no
    BatchMode yes
    ConnectTimeout 5
    ControlMaster no
    ControlPath none
    KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org
    LogLevel ERROR
"""
        )

    def _end(self, pids: list[int]) -> None:
        """SIGTERM *pids*, SIGKILL those alive after a grace (our sshd child is reaped)."""
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if self._popen is not None:
                self._popen.poll()
            if not any(_procs.is_alive(p) for p in pids):
                return
            time.sleep(0.01)
        for p in pids:
            if _procs.is_alive(p):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, signal.SIGKILL)

    def _log_tail(self, lines: int = 8) -> str:
        try:
            tail = self._log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return " | ".join(tail) or "(empty log)"

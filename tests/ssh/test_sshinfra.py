"""The SSH test infrastructure works with the real ``ssh`` client: proofs for each promise.

Layer: tests. Imports: stdlib, pytest, psutil, sshinfra.

Each test exercises one path the SSH manager will take: batch-mode login by alias and by
``user@host:port``, fast failures, the remote interpreter and environment, the cookie on
stdin, the ``distexec-worker HOST:PORT`` line, ``-L`` tunnels, cross-namespace
reachability, and a teardown that leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import sshinfra
from sshinfra import NetnsHosts, SSHKeys, SSHServer, shell_command, wait_until

ssh = pytest.mark.ssh
netns = pytest.mark.netns
timeout60 = pytest.mark.timeout(60)

# A remote echo server: prints "listening PORT", echoes one recv per connection, and
# exits when its stdin closes (i.e. when the ssh client that started it goes away).
ECHO_SERVER = """
import os, socket, sys, threading

def exit_on_eof():
    sys.stdin.buffer.read()
    os._exit(0)

threading.Thread(target=exit_on_eof, daemon=True).start()
server = socket.create_server((sys.argv[1], 0))
print("listening", server.getsockname()[1], flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        conn.sendall(conn.recv(1024))
"""

# What `python -m distexec.worker` does at start-up, minus distexec: cookie from stdin,
# listen, one "distexec-worker HOST:PORT" line, then serve the master.
FAKE_WORKER = """
import socket, sys
cookie = sys.stdin.buffer.readline().strip()
server = socket.create_server(("127.0.0.1", 0))
print(f"distexec-worker 127.0.0.1:{server.getsockname()[1]}", flush=True)
server.settimeout(30)
conn, _ = server.accept()
with conn:
    conn.sendall(cookie)
"""

# Connects to every HOST:PORT argument and prints {target: first bytes received}.
PROBE = """
import json, socket, sys
result = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            result[target] = sock.recv(64).decode(errors="replace")
    except OSError as exc:
        result[target] = f"error: {exc}"
print(json.dumps(result))
"""

# Sends argv[3] to argv[1]:argv[2] and prints the reply.
ECHO_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as sock:
    sock.sendall(sys.argv[3].encode())
    sock.shutdown(socket.SHUT_WR)
    print(sock.makefile("rb").read().decode())
"""


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


@contextmanager
def background(argv: Sequence[str], **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    """Start *argv* (no controlling terminal); kill and reap it on exit whatever happened."""
    proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
        list(argv), bufsize=0, start_new_session=True, **kwargs
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@contextmanager
def remote_echo_server(
    ssh_argv: Callable[[str], list[str]], python: str, bind: str
) -> Iterator[int]:
    """Run :data:`ECHO_SERVER` over ssh, bound to *bind*; yield its port; stop it via stdin EOF."""
    command = shell_command([python, "-c", ECHO_SERVER, bind])
    with background(
        ssh_argv(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        words = sshinfra.read_line(proc.stdout, timeout=15).split()
        assert words[0] == b"listening", words
        yield int(words[1])
        proc.stdin.close()  # EOF reaches the remote process, which exits
        assert proc.wait(timeout=10) == 0


def echo_roundtrip(host: str, port: int, payload: bytes) -> bytes | None:
    """Send *payload* to an echo server and return the reply, or None if it failed."""
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            return sock.makefile("rb").read()
    except OSError:
        return None


def cmdlines(procs: Sequence[psutil.Process]) -> list[list[str]]:
    """Command lines of *procs* that still exist."""
    lines = []
    for proc in procs:
        try:
            lines.append(proc.cmdline())
        except psutil.Error:
            continue
    return lines


def all_gone(procs: Sequence[psutil.Process]) -> bool:
    """Whether every one of *procs* has exited (a zombie counts as exited)."""
    return all(sshinfra._is_gone(proc) for proc in procs)


def forward_argv(
    ssh_argv: Callable[[str], list[str]], local_port: int, remote_port: int
) -> list[str]:
    """``ssh -N -L 127.0.0.1:local:127.0.0.1:remote <host>``, from a host's ``ssh_argv``."""
    argv = ssh_argv("")[:-1]  # drop the empty command
    host = argv.pop()  # the alias, after "--"
    return [*argv[:-1], "-N", "-L", f"127.0.0.1:{local_port}:127.0.0.1:{remote_port}", "--", host]


# --------------------------------------------------------------------------------------
# Loopback sshd
# --------------------------------------------------------------------------------------


@ssh
@timeout60
def test_ssh_to_alias_runs_true(sshd: SSHServer) -> None:
    result = subprocess.run(
        ["ssh", *sshd.sshflags, "dxhost", "true"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


@ssh
@timeout60
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_ssh_to_machine_spec_runs_true(sshd: SSHServer, host: str) -> None:
    """What SSHManager does with ``"user@host:port"``: ``ssh <sshflags> -p port user@host``."""
    assert sshd.destination == f"{sshd.user}@127.0.0.1:{sshd.port}"
    result = subprocess.run(
        ["ssh", *sshd.sshflags, "-p", str(sshd.port), f"{sshd.user}@{host}", "true"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


@ssh
@timeout60
@pytest.mark.parametrize("target", ["dxhost", "127.0.0.1", "root@example.invalid"])
def test_client_config_is_batch_mode_with_pinned_host_key(sshd: SSHServer, target: str) -> None:
    """``ssh -G`` shows the effective options: every destination is batch mode, key only."""
    result = subprocess.run(
        ["ssh", *sshd.sshflags, "-G", target], capture_output=True, timeout=10, check=True
    )
    options = set(result.stdout.decode().splitlines())
    expected = {
        "batchmode yes",
        "stricthostkeychecking true",
        "identitiesonly yes",
        "passwordauthentication no",
        "kbdinteractiveauthentication no",
        f"identityfile {sshd.identity_file}",
        f"userknownhostsfile {sshd.known_hosts}",
    }
    assert expected <= options, sorted(expected - options)


def _unregistered_key(server: SSHServer) -> list[str]:
    # Not through the config: IdentityFile accumulates, so the good key would be tried too.
    return [
        "ssh", "-F", "/dev/null", "-i", str(server.keys.wrong_key),
        "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
        "-o", f"UserKnownHostsFile={server.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-p", str(server.port), "--", f"{server.user}@{server.host}", "true",
    ]  # fmt: skip


def _unknown_host_key(server: SSHServer) -> list[str]:
    return [
        "ssh",
        *server.sshflags,
        "-o",
        "UserKnownHostsFile=/dev/null",
        "--",
        server.alias,
        "true",
    ]


def _closed_port(server: SSHServer) -> list[str]:
    closed = str(sshinfra.free_port())
    return ["ssh", *server.sshflags, "-p", closed, "--", f"{server.user}@127.0.0.1", "true"]


failure_cases = [
    pytest.param(_unregistered_key, "Permission denied", id="unregistered-key"),
    pytest.param(_unknown_host_key, "Host key verification failed", id="unknown-host-key"),
    pytest.param(_closed_port, "Connection refused", id="closed-port"),
]


@ssh
@timeout60
@pytest.mark.parametrize(("argv_for", "message"), failure_cases)
def test_failures_are_fast_and_never_prompt(
    sshd: SSHServer, argv_for: Callable[[SSHServer], list[str]], message: str
) -> None:
    """No terminal, stdin at EOF, batch mode: ssh must fail (255) quickly with a clear message."""
    started = time.monotonic()
    result = subprocess.run(
        argv_for(sshd),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        start_new_session=True,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 255
    assert message in result.stderr.decode(), result.stderr
    assert elapsed < 10, f"ssh took {elapsed:.1f} s to fail"


@ssh
@timeout60
def test_remote_python_is_this_interpreter(sshd: SSHServer) -> None:
    result = sshd.run(shell_command([sshd.python, "-c", "import sys; print(sys.version)"]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == sys.version
    assert os.path.isabs(sshd.python)


@ssh
@timeout60
def test_remote_env_makes_this_distexec_importable(sshd: SSHServer) -> None:
    code = "import distexec, os; print(os.path.dirname(list(distexec.__path__)[0]))"
    result = sshd.run(shell_command([sshd.python, "-c", code], env=sshd.remote_env))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == sshd.remote_env["PYTHONPATH"]


env_cases = [
    # (ssh options, extra local environment, remote variable, remote value)
    pytest.param((), {"DISTEXEC_LOCAL_ONLY": "1"}, "DISTEXEC_LOCAL_ONLY", "", id="not-inherited"),
    pytest.param(("-o", "SetEnv=DISTEXEC_PROBE=42"), {}, "DISTEXEC_PROBE", "42", id="acceptenv"),
    pytest.param(("-o", "SetEnv=PYTHONPATH=/x"), {}, "PYTHONPATH", "", id="not-accepted"),
]


@ssh
@timeout60
@pytest.mark.parametrize(("options", "local_env", "name", "expected"), env_cases)
def test_remote_environment(
    sshd: SSHServer, options: tuple[str, ...], local_env: dict[str, str], name: str, expected: str
) -> None:
    """The session environment is sshd's: only AcceptEnv'd SetEnv variables travel."""
    result = subprocess.run(
        sshd.ssh_argv(f'printf %s "${{{name}-}}"', *options),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        env={**os.environ, **local_env},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == expected


@ssh
@timeout60
def test_sessions_carry_the_server_tag(sshd: SSHServer) -> None:
    result = sshd.run(f'printf %s "${sshinfra.TAG_VAR}"')
    assert result.stdout.decode() == sshd.tag


@ssh
@timeout60
def test_stdin_reaches_the_remote_command(sshd: SSHServer) -> None:
    """The cookie travels on stdin: ``cat`` gives back exactly what was written."""
    secret = secrets.token_hex(32).encode() + b"\n"
    result = sshd.run("cat", input=secret)
    assert result.returncode == 0, result.stderr
    assert result.stdout == secret


@ssh
@timeout60
def test_worker_style_launch(sshd: SSHServer) -> None:
    """Cookie on stdin, one ``distexec-worker HOST:PORT`` line on stdout, master connects."""
    cookie = secrets.token_hex(16).encode()
    command = shell_command([sshd.python, "-c", FAKE_WORKER])
    with background(sshd.ssh_argv(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(cookie + b"\n")
        line = sshinfra.read_line(proc.stdout, timeout=15).decode()
        assert line.startswith("distexec-worker "), line
        host, port = line.split()[1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            assert conn.makefile("rb").read() == cookie
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0


@ssh
@timeout60
def test_ten_parallel_connections(sshd: SSHServer) -> None:
    """``addprocs(..., max_parallel=10)`` opens ten sessions at once."""
    procs = [
        subprocess.Popen(
            sshd.ssh_argv("echo ok"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        for _ in range(10)
    ]
    try:
        outputs = [proc.communicate(timeout=30) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert [proc.returncode for proc in procs] == [0] * 10, [err for _, err in outputs]
    assert [out for out, _ in outputs] == [b"ok\n"] * 10


@ssh
@timeout60
def test_local_port_forwarding(sshd: SSHServer) -> None:
    """``ssh -N -L`` (tunnel mode) reaches a remote listener bound to the remote loopback."""
    with remote_echo_server(sshd.ssh_argv, sshd.python, "127.0.0.1") as remote_port:
        local_port = sshinfra.free_port()
        argv = forward_argv(sshd.ssh_argv, local_port, remote_port)
        with background(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE):
            wait_until(
                lambda: echo_roundtrip("127.0.0.1", local_port, b"tunnel") == b"tunnel",
                timeout=15,
                what=f"the -L tunnel on port {local_port} echoes",
            )


@ssh
@timeout60
def test_sessions_end_with_their_connection(sshd: SSHServer) -> None:
    """After a command finishes, its per-connection sshd processes go away."""
    assert sshd.run("true").returncode == 0
    wait_until(
        lambda: [p.pid for p in sshd.processes()] == [sshd.pid],
        timeout=10,
        what="only the sshd listener is left",
    )


@ssh
@timeout60
def test_teardown_leaves_no_process(ssh_keys: SSHKeys, tmp_path: Path) -> None:
    """close() stops the listener, a live session and a process that escaped with setsid."""
    started = time.monotonic()
    server = SSHServer(ssh_keys, tmp_path / "sshd", alias="dxteardown").start()
    setup = time.monotonic() - started
    try:
        with background(
            server.ssh_argv("sleep 30"), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        ) as session:
            escaped = server.run("setsid sleep 31 </dev/null >/dev/null 2>&1 &")
            assert escaped.returncode == 0, escaped.stderr
            wait_until(
                lambda: (
                    {("sleep", "30"), ("sleep", "31")}
                    <= {tuple(line) for line in cmdlines(server.processes())}
                ),
                timeout=10,
                what="the session and the escaped process are visible",
            )
            procs = server.processes()
            port = server.port
            server.close()
            assert all_gone(procs), cmdlines(procs)
            assert not sshinfra.port_accepts("127.0.0.1", port)
            assert session.wait(timeout=10) == 255  # the client saw its connection die
    finally:
        server.close()
    server.close()  # idempotent
    assert server.state == "closed"
    assert setup < 5, f"sshd took {setup:.2f} s to start"


# --------------------------------------------------------------------------------------
# Network namespaces as hosts
# --------------------------------------------------------------------------------------


@ssh
@netns
@timeout60
def test_every_host_accepts_ssh(netns_hosts: NetnsHosts) -> None:
    assert len(netns_hosts) == 2
    for host in netns_hosts:
        by_alias = netns_hosts.run(host, "true")
        assert by_alias.returncode == 0, by_alias.stderr
        user_host, port = host.destination.rsplit(":", 1)
        by_spec = subprocess.run(
            ["ssh", *netns_hosts.sshflags, "-p", port, user_host, "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
        assert by_spec.returncode == 0, by_spec.stderr


@ssh
@netns
@timeout60
def test_remote_commands_run_inside_their_namespace(netns_hosts: NetnsHosts) -> None:
    for host in netns_hosts:
        result = netns_hosts.run(host, "readlink /proc/self/ns/net")
        inode = os.stat(f"/run/netns/{host.name}").st_ino
        assert result.stdout.decode().strip() == f"net:[{inode}]"


@ssh
@netns
@timeout60
def test_all_to_all_reachability(netns_hosts: NetnsHosts) -> None:
    """The root namespace and every host reach every host's sshd, and hosts reach the root."""
    assert netns_hosts.root_addr is not None
    with socket.create_server((netns_hosts.root_addr, 0)) as root_listener:
        root_target = f"{netns_hosts.root_addr}:{root_listener.getsockname()[1]}"

        def serve_root() -> None:
            for _ in netns_hosts:
                conn, _ = root_listener.accept()
                with conn:
                    conn.sendall(b"root")

        server_thread = threading.Thread(target=serve_root, daemon=True)
        server_thread.start()
        targets = [f"{h.addr}:{h.port}" for h in netns_hosts]
        sources = {"root": [netns_hosts.python, "-c", PROBE, *targets]}
        for host in netns_hosts:
            sources[host.name] = host.exec_argv(
                netns_hosts.python, "-c", PROBE, *targets, root_target
            )
        for source, argv in sources.items():
            result = sshinfra.run_command(argv, timeout=30)
            replies = json.loads(result.stdout)
            for target, reply in replies.items():
                expected = "root" if target == root_target else "SSH-2.0-OpenSSH"
                assert reply.startswith(expected), (source, target, reply)
        server_thread.join(timeout=10)
        assert not server_thread.is_alive()


@ssh
@netns
@timeout60
def test_listener_in_one_host_is_reachable_from_root_and_other_host(
    netns_hosts: NetnsHosts,
) -> None:
    host_a, host_b = netns_hosts[0], netns_hosts[1]
    python = netns_hosts.python

    def on_a(command: str) -> list[str]:
        return netns_hosts.ssh_argv(host_a, command)

    with remote_echo_server(on_a, python, host_a.addr) as port:
        assert echo_roundtrip(host_a.addr, port, b"from-root") == b"from-root"
        client = shell_command([python, "-c", ECHO_CLIENT, host_a.addr, str(port), "from-b"])
        result = netns_hosts.run(host_b, client)
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().strip() == "from-b"


@ssh
@netns
@timeout60
def test_forwarding_into_a_hosts_loopback(netns_hosts: NetnsHosts) -> None:
    """A listener on host a's own 127.0.0.1 is reachable only through an ``-L`` tunnel."""
    host_a = netns_hosts[0]

    def on_a(command: str) -> list[str]:
        return netns_hosts.ssh_argv(host_a, command)

    with remote_echo_server(on_a, netns_hosts.python, "127.0.0.1") as remote_port:
        local_port = sshinfra.free_port()
        with background(
            forward_argv(on_a, local_port, remote_port),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        ):
            wait_until(
                lambda: echo_roundtrip("127.0.0.1", local_port, b"into-ns") == b"into-ns",
                timeout=15,
                what=f"the -L tunnel into {host_a.name} echoes",
            )


@ssh
@netns
@timeout60
def test_netns_teardown_removes_everything(ssh_keys: SSHKeys, tmp_path: Path) -> None:
    started = time.monotonic()
    hosts = NetnsHosts(ssh_keys, tmp_path, count=1)
    problem: sshinfra.NetnsUnavailable | None = None
    try:
        hosts.start()
    except sshinfra.NetnsUnavailable as exc:
        problem = exc  # skip outside the except block: no chained traceback in the report
    if problem is not None:
        sshinfra.skip_or_fail(problem, sshinfra.REQUIRE_NETNS)
    setup = time.monotonic() - started
    try:
        host = hosts[0]
        escaped = hosts.run(host, "setsid sleep 32 </dev/null >/dev/null 2>&1 &")
        assert escaped.returncode == 0, escaped.stderr
        wait_until(
            lambda: ["sleep", "32"] in cmdlines(host.server.processes()),
            timeout=10,
            what="the escaped process is visible",
        )
        procs = host.server.processes()
    finally:
        hosts.close()
    assert all_gone(procs), cmdlines(procs)
    namespaces = sshinfra.run_command(["ip", "netns", "list"]).stdout.decode()
    assert host.name not in namespaces
    links = sshinfra.run_command(["ip", "-o", "link", "show"]).stdout.decode()
    assert hosts.bridge not in links
    assert f"dxv-{hosts.tag}" not in links
    assert setup < 5, f"namespace hosts took {setup:.2f} s to start"


@ssh
@timeout60
def test_missing_iproute2_is_reported_as_unavailable(ssh_keys: SSHKeys, tmp_path: Path) -> None:
    hosts = NetnsHosts(ssh_keys, tmp_path, ip="/nonexistent/ip")
    with pytest.raises(sshinfra.NetnsUnavailable, match=r"^network namespaces unavailable: "):
        hosts.start()
    assert hosts.state == "closed"


skip_cases = [
    pytest.param({}, pytest.skip.Exception, id="skip"),
    pytest.param({sshinfra.REQUIRE_NETNS: "1"}, pytest.fail.Exception, id="required"),
    pytest.param({sshinfra.REQUIRE_NETNS: "0"}, pytest.skip.Exception, id="not-1"),
]


@pytest.mark.parametrize(("environ", "outcome"), skip_cases)
def test_unavailable_skips_unless_required(
    environ: dict[str, str], outcome: type[BaseException]
) -> None:
    reason = "network namespaces unavailable: ip netns add: Operation not permitted"
    with pytest.raises(outcome, match=reason):
        sshinfra.skip_or_fail(
            sshinfra.NetnsUnavailable(reason), sshinfra.REQUIRE_NETNS, environ=environ
        )

"""SSHManager against a real sshd on loopback, two network-namespace hosts, and a fake ssh.

Layer: tests. Imports: stdlib, pytest, psutil, sshinfra, helpers, distexec.

The loopback server and the namespace hosts share this machine's PID space, so a worker's
OS pid (asked over remotecall) can be checked with psutil here. Every test leaves no worker,
no ssh process and no session behind (the autouse fixture checks the local side; tests that
use a server also wait until only its listener is left).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest
import sshinfra
from helpers import Collector, wait_until
from sshinfra import NetnsHosts, SSHServer

import distexec as dx
from distexec._machinefile import Machine, merge_machines
from distexec.managers import ssh as ssh_manager
from distexec.managers.ssh import SSHManager

ssh = pytest.mark.ssh
netns = pytest.mark.netns

# Workers cannot import this test module: send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# --------------------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------------------


def _is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _ssh_children() -> list[psutil.Process]:
    """Our descendants that are ssh clients, or zombies (an unreaped ssh is a leak too)."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE or child.name() in ("ssh", "fake_ssh"):
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


def _describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {p.status()} {p.cmdline()}")
        except psutil.Error:
            continue
    return out


def _is_master(proc: psutil.Process) -> bool:
    try:
        return "ControlMaster=yes" in proc.cmdline()
    except psutil.Error:
        return False


def _live_clients() -> list[psutil.Process]:
    """Our running ssh clients (not the zombies a session under our sshd leaves briefly)."""
    out = []
    for p in _ssh_children():
        try:
            if p.name() == "ssh" and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def _masters() -> list[psutil.Process]:
    """Our ssh master connections (``multiplex=True``)."""
    return [p for p in _live_clients() if _is_master(p)]


def _sessions() -> list[psutil.Process]:
    """Our ssh clients that are not masters: a session each (or an ``ssh -L``)."""
    return [p for p in _live_clients() if not _is_master(p)]


def _control_path(master: psutil.Process) -> str:
    [option] = [a for a in master.cmdline() if a.startswith("ControlPath=")]
    return option.split("=", 1)[1]


def _control_dirs(pid: int | None = None) -> list[str]:
    """The control-socket directories of process *pid* (default: this one) still there."""
    prefix = f"dxssh-{pid or os.getpid()}-"
    bases = {tempfile.gettempdir(), "/tmp"}
    return [
        os.path.join(b, n)
        for b in bases
        if os.path.isdir(b)
        for n in os.listdir(b)
        if n.startswith(prefix)
    ]


def logins(server: SSHServer) -> int:
    """Connections *server* has let in so far (sshd logs one line per login, VERBOSE)."""
    return server.log_path.read_text(errors="replace").count("Accepted publickey")


def settles(server: SSHServer, timeout: float = 15) -> None:
    """Wait until *server* has no session left (only its listener)."""
    wait_until(
        lambda: [p.pid for p in server.processes()] == [server.pid],
        timeout=timeout,
        what=f"only the sshd listener left: {_describe(server.processes())}",
    )


@pytest.fixture(autouse=True)
def no_ssh_leftovers() -> Iterator[None]:
    """Remove whatever workers a test left, then require that no ssh process of ours is left."""
    yield
    live = [p for p in dx.workers() if p != 1]
    if live:
        dx.rmprocs(live)
    wait_until(
        lambda: not _ssh_children(),
        timeout=15,
        what=f"no ssh client left: {_describe(_ssh_children())}",
    )
    wait_until(
        lambda: not _manager_threads(),
        timeout=15,
        what=f"no SSHManager thread left: {_manager_threads()}",
    )
    assert not _control_dirs(), "control socket directories left"


def _manager_threads() -> list[str]:
    names = [t.name for t in threading.enumerate()]
    return [n for n in names if n.startswith(("distexec-ssh-", "distexec-tunnel-"))]


def kw(server: SSHServer | NetnsHosts, **extra: Any) -> dict[str, Any]:
    """The addprocs keywords every test needs to reach a server with this interpreter."""
    return {
        "sshflags": server.sshflags,
        "exename": server.python,
        "env": server.remote_env,
        **extra,
    }


def worker_facts() -> dict[str, Any]:
    """Run on a worker: what it knows about itself."""
    import os

    import distexec

    return {
        "myid": distexec.myid(),
        "ospid": os.getpid(),
        "netns": os.readlink("/proc/self/ns/net"),
        "cwd": os.getcwd(),
    }


def getenv(name: str) -> str | None:
    """Run on a worker (``os.environ.get`` would pickle *our* environment along)."""
    import os

    return os.environ.get(name)


def bind_arg(ospid: int) -> str:
    """The ``--bind`` address in a worker's command line (same PID space: read it here)."""
    cmdline = psutil.Process(ospid).cmdline()
    return cmdline[cmdline.index("--bind") + 1]


def closed_port() -> int:
    return sshinfra.free_port()


# --------------------------------------------------------------------------------------
# Loopback sshd
# --------------------------------------------------------------------------------------


@ssh
@pytest.mark.timeout(60)
def test_one_worker_over_ssh(sshd: SSHServer) -> None:
    [w] = dx.addprocs([sshd.destination], **kw(sshd))
    facts = dx.remotecall_fetch(worker_facts, w)
    assert facts["myid"] == w
    assert facts["ospid"] != os.getpid()
    assert dx.workers() == [w]
    assert bind_arg(facts["ospid"]) == "127.0.0.1"
    assert facts["cwd"] == os.path.expanduser("~")  # no dir=: the login directory
    dx.rmprocs(w)
    assert _is_gone(facts["ospid"])
    assert dx.workers() == [1]
    settles(sshd)


@ssh
@pytest.mark.timeout(60)
@pytest.mark.parametrize("multiplex", [True, False], ids=["multiplex", "own-connections"])
def test_count_gives_that_many_workers_and_rmprocs_leaves_nothing(
    sshd: SSHServer, multiplex: bool
) -> None:
    before = logins(sshd)
    pids = dx.addprocs([(sshd.destination, 3)], **kw(sshd, multiplex=multiplex))
    assert len(pids) == 3 and pids == sorted(pids)
    ospids = {dx.remotecall_fetch(os.getpid, p) for p in pids}
    assert len(ospids) == 3 and os.getpid() not in ospids
    assert len(_sessions()) == 3  # one session per worker
    assert len(_masters()) == (1 if multiplex else 0)  # ... over one shared connection
    assert logins(sshd) - before == (1 if multiplex else 3)
    assert dx.remotecall_fetch(lambda: dx.remotecall_fetch(dx.myid, pids[0]), pids[2]) == pids[0]
    dx.rmprocs(pids)
    assert all(_is_gone(p) for p in ospids)
    assert not _live_clients()  # the master too: rmprocs of the last worker waits for it
    assert not _control_dirs()
    settles(sshd)


def _check(server: SSHServer, control_path: str) -> subprocess.CompletedProcess[str]:
    """``ssh -O check``: whether a master answers on *control_path*."""
    return subprocess.run(
        ["ssh", *server.sshflags, "-o", f"ControlPath={control_path}", "-O", "check", "dxhost"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


@ssh
@pytest.mark.timeout(60)
def test_multiplexed_sessions_share_a_master_in_a_private_directory(sshd: SSHServer) -> None:
    pids = dx.addprocs([(sshd.destination, 2)], **kw(sshd, multiplex=True))
    [master] = _masters()
    path = _control_path(master)
    assert all(f"ControlPath={path}" in s.cmdline() for s in _sessions())
    assert len(os.fsencode(path)) + 17 < 104  # ssh binds "<path>.<16 chars>" first
    directory = os.path.dirname(path)
    assert _control_dirs() == [directory]
    assert os.stat(directory).st_mode & 0o777 == 0o700
    assert os.stat(directory).st_uid == os.geteuid()
    assert f"Master running (pid={master.pid})" in _check(sshd, path).stderr
    # The launch is over: the master's own session (its lifeline) has ended.
    assert [dx.remotecall_fetch(dx.myid, p) for p in pids] == pids
    dx.rmprocs(pids)
    assert _is_gone(master.pid)
    assert not os.path.exists(directory)
    assert _check(sshd, path).returncode != 0
    settles(sshd)


@ssh
@pytest.mark.timeout(90)
def test_one_workers_end_leaves_the_others_on_the_shared_connection(sshd: SSHServer) -> None:
    """A killed session takes its worker only; rmprocs of one leaves the others; the master
    ends with the last of them."""
    pids = dx.addprocs([(sshd.destination, 3)], **kw(sshd, multiplex=True))
    [master] = _masters()
    path = _control_path(master)
    ospids = {p: dx.remotecall_fetch(os.getpid, p) for p in pids}
    # Kill one session's client: which worker it carried, we learn from who goes away.
    _sessions()[0].send_signal(signal.SIGKILL)
    wait_until(
        lambda: sum(_is_gone(o) for o in ospids.values()) == 1,
        timeout=20,
        what="the killed session's worker exits",
    )
    [lost] = [p for p, o in ospids.items() if _is_gone(o)]
    alive = [p for p in pids if p != lost]
    assert [dx.remotecall_fetch(dx.myid, p) for p in alive] == alive
    assert f"pid={master.pid}" in _check(sshd, path).stderr
    dx.rmprocs(alive[0])
    assert dx.remotecall_fetch(dx.myid, alive[1]) == alive[1]
    assert not _is_gone(master.pid)
    dx.rmprocs(alive[1])
    assert _is_gone(master.pid) and not _control_dirs()
    settles(sshd)


@ssh
@pytest.mark.timeout(90)
def test_a_master_carries_at_most_sessions_per_master(
    sshd: SSHServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sshd allows MaxSessions (10) per connection: a machine's workers are spread over
    masters of ``_SESSIONS_PER_MASTER`` sessions each."""
    monkeypatch.setattr(ssh_manager, "_SESSIONS_PER_MASTER", 2)
    before = logins(sshd)
    pids = dx.addprocs([(sshd.destination, 3)], **kw(sshd, multiplex=True))
    assert len(_masters()) == 2 and len(_sessions()) == 3
    assert logins(sshd) - before == 2
    assert [dx.remotecall_fetch(dx.myid, p) for p in pids] == pids
    dx.rmprocs(pids)
    assert not _live_clients() and not _control_dirs()
    settles(sshd)


@ssh
@pytest.mark.timeout(60)
def test_duplicate_specs_are_merged_and_alias_binds_where_ssh_went(sshd: SSHServer) -> None:
    """``dxhost`` is an ssh alias: the worker binds the address $SSH_CONNECTION names.
    Where that is cannot be known before ssh goes there, so plain TCP is warned of."""
    with pytest.warns(UserWarning, match=rf"listen on {sshd.alias} without TLS"):
        pids = dx.addprocs([sshd.alias, (sshd.alias, 1)], **kw(sshd))
    assert len(pids) == 2
    for p in pids:
        assert bind_arg(dx.remotecall_fetch(os.getpid, p)) == "127.0.0.1"


@ssh
@pytest.mark.timeout(60)
def test_count_auto_is_the_hosts_usable_cpus(sshd: SSHServer) -> None:
    from loky import cpu_count

    before = logins(sshd)
    pids = dx.addprocs([(sshd.destination, "auto")], **kw(sshd, multiplex=True))
    assert len(pids) == cpu_count()
    assert logins(sshd) - before == 1  # the question went over the workers' connection


@ssh
@pytest.mark.timeout(60)
@pytest.mark.parametrize("tilde", [False, True], ids=["absolute", "tilde"])
def test_dir_and_env_reach_the_worker(sshd: SSHServer, tmp_path: Path, tilde: bool) -> None:
    tricky = "a b'c\"$HOME`x`;"
    if tilde:  # "~/..." is the remote $HOME: make a directory under ours (same machine)
        workdir = Path(tempfile.mkdtemp(prefix="dx ssh ", dir=Path.home()))
        directory = "~/" + workdir.name
    else:
        workdir = tmp_path / "work dir"
        workdir.mkdir()
        directory = str(workdir)
    try:
        _check_dir_and_env(sshd, workdir, directory, tricky)
    finally:
        if tilde:
            workdir.rmdir()


def _check_dir_and_env(sshd: SSHServer, workdir: Path, directory: str, tricky: str) -> None:
    env = {**sshd.remote_env, "DX_TRICKY": tricky}
    [w] = dx.addprocs([sshd.destination], **kw(sshd, dir=directory, env=env))
    assert dx.remotecall_fetch(os.getcwd, w) == str(workdir)
    assert dx.remotecall_fetch(getenv, w, "DX_TRICKY") == tricky
    assert dx.remotecall_fetch(getenv, w, "OPENBLAS_NUM_THREADS") == "1"
    timeout = os.environ.get("DISTEXEC_WORKER_TIMEOUT")
    assert dx.remotecall_fetch(getenv, w, "DISTEXEC_WORKER_TIMEOUT") == timeout


@ssh
@pytest.mark.timeout(60)
@pytest.mark.parametrize("tunnel", [False, True], ids=["direct", "tunnel"])
def test_worker_output_is_relayed(
    sshd: SSHServer, monkeypatch: pytest.MonkeyPatch, tunnel: bool
) -> None:
    out, err = Collector(), Collector()
    monkeypatch.setattr(sys, "stdout", out)  # the relay binds the streams it finds at launch
    monkeypatch.setattr(sys, "stderr", err)
    [w] = dx.addprocs([sshd.destination], **kw(sshd, tunnel=tunnel))
    token = secrets.token_hex(4)
    dx.remotecall_fetch(lambda: print("hello", token, flush=True), w)
    dx.remotecall_fetch(lambda: print("oops", token, file=sys.stderr, flush=True), w)
    wait_until(
        lambda: f"From worker {w}: hello {token}" in out.text,
        what="the worker's stdout to be relayed to ours",
    )
    wait_until(
        lambda: f"From worker {w}: oops {token}" in err.text,
        what="the worker's stderr to be relayed to ours",
    )


def spin_after_marking(marker: str) -> None:
    """Run on a worker: create *marker* (same filesystem), then spin until interrupted."""
    Path(marker).touch()
    while True:
        time.sleep(0.01)


@ssh
@pytest.mark.timeout(60)
def test_interrupt_reaches_a_call_over_ssh(sshd: SSHServer, tmp_path: Path) -> None:
    [w] = dx.addprocs([sshd.destination], **kw(sshd))
    marker = tmp_path / "spinning"
    fut = dx.remotecall(spin_after_marking, w, str(marker))
    wait_until(marker.exists, timeout=10, what="the call runs")
    dx.interrupt(w)
    with pytest.raises(dx.RemoteException) as info:
        fut.result(timeout=10)
    assert isinstance(info.value.captured.ex, KeyboardInterrupt)
    assert dx.remotecall_fetch(dx.myid, w) == w  # interrupted once; the worker lives on


@ssh
@pytest.mark.timeout(60)
@pytest.mark.parametrize("multiplex", [True, False], ids=["multiplex", "own-connection"])
def test_killed_ssh_session_takes_the_worker_down(sshd: SSHServer, multiplex: bool) -> None:
    """Without a pty the worker gets no SIGHUP: it must exit on stdin EOF by itself."""
    [w] = dx.addprocs([sshd.destination], **kw(sshd, multiplex=multiplex))
    ospid = dx.remotecall_fetch(os.getpid, w)
    [client] = _sessions()
    client.send_signal(signal.SIGKILL)
    wait_until(lambda: _is_gone(ospid), timeout=20, what=f"worker {ospid} exits on its own")

    def master_saw_it() -> bool:
        try:
            dx.remotecall_fetch(os.getpid, w)
        except dx.ProcessExitedException:
            return True
        return False

    wait_until(master_saw_it, timeout=20, what="the master sees the worker gone")
    with pytest.raises(dx.ProcessExitedException):
        dx.remotecall_fetch(os.getpid, w)
    settles(sshd)


def _worker_ports(ospids: list[int]) -> set[int]:
    return {
        c.laddr.port
        for ospid in ospids
        for c in psutil.Process(ospid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }


@ssh
@pytest.mark.timeout(90)
@pytest.mark.parametrize("multiplex", [True, False], ids=["multiplex", "own-connections"])
def test_tunnel_mode(sshd: SSHServer, multiplex: bool) -> None:
    before = logins(sshd)
    pids = dx.addprocs([(sshd.destination, 2)], **kw(sshd, tunnel=True, multiplex=multiplex))
    ospids = [dx.remotecall_fetch(os.getpid, p) for p in pids]
    for ospid in ospids:
        assert bind_arg(ospid) == "127.0.0.1"
        assert "--allow-insecure-network" not in psutil.Process(ospid).cmdline()
    forwards = [p for p in _live_clients() if "-L" in p.cmdline()]
    if multiplex:
        # One connection: the workers' sessions and both forwards (the master listens).
        assert not forwards and len(_sessions()) == 2 and logins(sshd) - before == 1
        [master] = _masters()
        listening = {
            c.laddr.port
            for c in master.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.ip == "127.0.0.1"
        }
        assert len(listening) == 2
        assert not listening & _worker_ports(ospids)  # their ports are taken here (by them)
    else:
        # Two sessions per worker: the worker's and the -L forward.
        assert len(forwards) == 2 and len(_live_clients()) == 4
        for forward in forwards:  # the worker's port is taken here (by the worker itself)
            spec = forward.cmdline()[forward.cmdline().index("-L") + 1]
            _, local, _, remote = spec.split(":")
            assert local != remote, spec
    assert dx.remotecall_fetch(lambda: dx.remotecall_fetch(dx.myid, pids[0]), pids[1]) == pids[0]
    dx.rmprocs(pids)
    assert all(_is_gone(p) for p in ospids)
    wait_until(lambda: not _ssh_children(), timeout=10, what="workers' ssh and tunnels gone")
    settles(sshd)


MASTER = """
import json, os, sys
import distexec as dx
kw = json.loads(sys.argv[1])
dest = kw.pop("dest")
pids = dx.addprocs([dest], **kw) + dx.addprocs([dest], tunnel=True, **kw)
print(json.dumps([dx.remotecall_fetch(os.getpid, p) for p in pids]), flush=True)
sys.stdin.read()
"""


@ssh
@pytest.mark.timeout(60)
def test_master_death_ends_sessions_workers_and_tunnels(sshd: SSHServer) -> None:
    """SIGKILL the master: its ssh clients see stdin EOF, and so do the remote commands."""
    options = {
        "dest": sshd.destination,
        **kw(sshd, sshflags=list(sshd.sshflags), multiplex=True),
    }
    master = subprocess.Popen(
        [sys.executable, "-c", MASTER, json.dumps(options)],
        bufsize=0,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, **sshd.remote_env},
    )
    try:
        assert master.stdout is not None
        ospids = json.loads(sshinfra.read_line(master.stdout, timeout=30))
        clients = psutil.Process(master.pid).children(recursive=True)
        # Each addprocs: a master connection and a session on it (the forward is the master's).
        assert len(clients) == 4 and len([c for c in clients if _is_master(c)]) == 2
        assert len(_control_dirs(master.pid)) == 2
    finally:
        master.kill()
        master.wait(10)
    wait_until(lambda: all(_is_gone(p) for p in ospids), timeout=20, what="both workers exit")
    wait_until(
        lambda: all(_is_gone(c.pid) for c in clients), timeout=20, what="the ssh clients exit"
    )
    settles(sshd)
    # A killed process cannot remove its control directories (ssh removed the sockets):
    # the next master connection made anywhere removes those of dead processes.
    assert all(not os.listdir(d) for d in _control_dirs(master.pid))
    ssh_manager._remove_stale_control_dirs(tempfile.gettempdir())
    assert not _control_dirs(master.pid)


EXITING_MASTER = """
import json, os, sys
import distexec as dx
kw = json.loads(sys.argv[1])
dest = kw.pop("dest")
pids = dx.addprocs([(dest, 2)], **kw)
print(json.dumps([dx.remotecall_fetch(os.getpid, p) for p in pids]), flush=True)
"""


@ssh
@pytest.mark.timeout(60)
def test_a_master_that_exits_without_rmprocs_leaves_nothing(sshd: SSHServer) -> None:
    """Normal interpreter exit: the exit hooks remove the workers, the master connection
    ends, its control directory goes."""
    options = {
        "dest": sshd.destination,
        **kw(sshd, sshflags=list(sshd.sshflags), multiplex=True),
    }
    master = subprocess.Popen(
        [sys.executable, "-c", EXITING_MASTER, json.dumps(options)],
        stdout=subprocess.PIPE,
        env={**os.environ, **sshd.remote_env},
    )
    out, _ = master.communicate(timeout=45)
    assert master.returncode == 0
    ospids = json.loads(out)
    wait_until(lambda: all(_is_gone(p) for p in ospids), timeout=20, what="both workers exit")
    assert not _control_dirs(master.pid)
    settles(sshd)  # no session, and no connection (the master's) left on the server


tunnel_victims = [
    ("worker", True),
    ("master", True),  # the forward is the master's: it ends with it, and so does the session
    ("worker", False),
    ("forward", False),
]


@ssh
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("victim", "multiplex"), tunnel_victims)
def test_either_end_of_a_tunnel_dying_ends_both(
    sshd: SSHServer, victim: str, multiplex: bool
) -> None:
    [w] = dx.addprocs([sshd.destination], **kw(sshd, tunnel=True, multiplex=multiplex))
    ospid = dx.remotecall_fetch(os.getpid, w)
    if victim == "worker":
        os.kill(ospid, signal.SIGKILL)
    elif victim == "master":
        [master] = _masters()
        master.send_signal(signal.SIGKILL)
    else:
        [forward] = [p for p in _live_clients() if "-L" in p.cmdline()]
        forward.send_signal(signal.SIGKILL)
    wait_until(lambda: _is_gone(ospid), timeout=20, what="the worker ends")
    wait_until(lambda: not _ssh_children(), timeout=20, what="session and tunnel end")
    with pytest.raises(dx.ProcessExitedException):
        dx.remotecall_fetch(os.getpid, w)
    settles(sshd)


def _wrong_key_flags(server: SSHServer) -> tuple[str, ...]:
    # Not through -F cfg: IdentityFile accumulates, so the good key would be tried too.
    return (
        "-F", "/dev/null", "-i", str(server.keys.wrong_key), "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none", "-o", f"UserKnownHostsFile={server.known_hosts}",
        "-o", "StrictHostKeyChecking=yes",
    )  # fmt: skip


@ssh
@pytest.mark.timeout(60)
@pytest.mark.parametrize("multiplex", [True, False], ids=["multiplex", "own-connections"])
def test_wrong_key_is_a_launch_error_with_ssh_stderr(sshd: SSHServer, multiplex: bool) -> None:
    """With multiplex, the master connection fails: each worker reports its error."""
    started = time.monotonic()
    with pytest.raises(dx.LaunchError) as info:
        dx.addprocs(
            [(sshd.destination, 2)],
            sshflags=_wrong_key_flags(sshd),
            exename=sshd.python,
            env=sshd.remote_env,
            multiplex=multiplex,
        )
    assert time.monotonic() - started < 15
    assert "Permission denied" in str(info.value)
    assert "exit status 255" in str(info.value)
    assert "2 workers: " in str(info.value)  # two identical failures, said once
    assert info.value.host == "127.0.0.1"
    assert dx.workers() == [1]
    settles(sshd)


failure_cases = [
    pytest.param(lambda s: f"nosuchuser@127.0.0.1:{s.port}", "Permission denied", id="bad-user"),
    pytest.param(
        lambda s: f"{s.user}@127.0.0.1:{closed_port()}", "Connection refused", id="closed-port"
    ),
]


@ssh
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("bad_spec", "message"), failure_cases)
def test_a_failed_host_does_not_stop_the_others(
    sshd: SSHServer, bad_spec: Any, message: str
) -> None:
    started = time.monotonic()
    with pytest.raises(dx.LaunchError) as info:
        dx.addprocs([bad_spec(sshd), (sshd.destination, 2)], **kw(sshd))
    assert time.monotonic() - started < 15, "a failing ssh must fail fast"
    assert message in str(info.value)
    assert message in info.value.stderr_tail
    good = dx.workers()
    assert len(good) == 2 and 1 not in good  # the good host's workers came up and stay
    assert [dx.remotecall_fetch(dx.myid, p) for p in good] == good
    dx.rmprocs(good)
    settles(sshd)


@ssh
@pytest.mark.timeout(60)
def test_a_worker_that_cannot_start_reports_its_stderr(sshd: SSHServer) -> None:
    with pytest.raises(dx.LaunchError) as info:
        dx.addprocs([sshd.destination], **kw(sshd, exename="/nonexistent/python3"))
    assert "exit status 127" in str(info.value)
    assert "/nonexistent/python3" in str(info.value)
    settles(sshd)


@ssh
@pytest.mark.timeout(60)
def test_a_silent_worker_times_out(sshd: SSHServer) -> None:
    """A remote program that never reports an address: WorkerTimeoutError, nothing left."""
    silent = ("-c", "import sys; sys.stdin.read()")  # runs until its session closes
    started = time.monotonic()
    with pytest.raises(dx.WorkerTimeoutError, match="did not start within 2 s"):
        dx.addprocs([sshd.destination], **kw(sshd, exeflags=silent, timeout=2))
    assert time.monotonic() - started < 10
    settles(sshd)


@ssh
@pytest.mark.timeout(60)
def test_ssh_keywords_are_validated(sshd: SSHServer) -> None:
    with pytest.raises(ValueError, match="Invalid keyword argument sshflag"):
        dx.addprocs([sshd.destination], sshflag=sshd.sshflags)
    with pytest.raises(dx.LaunchError, match="max_parallel must be a positive int"):
        dx.addprocs([sshd.destination], **kw(sshd, max_parallel=0))
    with pytest.raises(ValueError, match="invalid machine spec '-oProxyCommand=x'"):
        dx.addprocs(["-oProxyCommand=x"], **kw(sshd))
    assert dx.workers() == [1]


@ssh
@pytest.mark.timeout(60)
def test_a_manager_object_keeps_its_defaults(sshd: SSHServer) -> None:
    manager = SSHManager([(sshd.destination, 2)], sshflags=sshd.sshflags, max_parallel=1)
    assert manager.default_params()["max_parallel"] == 1
    pids = dx.addprocs(manager, exename=sshd.python, env=sshd.remote_env)
    assert len(pids) == 2


# --------------------------------------------------------------------------------------
# Network namespaces as hosts
# --------------------------------------------------------------------------------------


@ssh
@netns
@pytest.mark.timeout(90)
def test_workers_on_two_hosts_reach_each_other(netns_hosts: NetnsHosts) -> None:
    host_a, host_b = netns_hosts[0], netns_hosts[1]
    # One by ssh alias (bind address from $SSH_CONNECTION), one by user@addr:port.
    with pytest.warns(UserWarning, match=rf"{host_a.ssh_alias}, {host_b.addr} without TLS"):
        pids = dx.addprocs(
            [host_a.ssh_alias, host_b.destination], **kw(netns_hosts, multiplex=True)
        )
    assert len(pids) == 2
    assert len(_masters()) == 2  # one master connection per host
    namespaces = {f"net:[{os.stat(f'/run/netns/{h.name}').st_ino}]": h.addr for h in netns_hosts}
    facts = {p: dx.remotecall_fetch(worker_facts, p) for p in pids}
    addrs = {namespaces[f["netns"]]: p for p, f in facts.items()}
    assert set(addrs) == {host_a.addr, host_b.addr}, facts  # one worker in each namespace
    for addr, p in addrs.items():
        assert bind_arg(facts[p]["ospid"]) == addr  # each listens on its own host's address
    w1, w2 = pids
    assert dx.remotecall_fetch(lambda: dx.remotecall_fetch(dx.myid, w2), w1) == w2
    assert dx.remotecall_fetch(lambda: dx.remotecall_fetch(dx.myid, w1), w2) == w1
    dx.rmprocs(pids)
    for host in netns_hosts:
        settles(host.server)


@ssh
@netns
@pytest.mark.timeout(90)
def test_tunnel_into_a_namespace_host(netns_hosts: NetnsHosts) -> None:
    """Workers listen on the host's own loopback; same-host workers still reach each other."""
    host_a = netns_hosts[0]
    pids = dx.addprocs([(host_a.destination, 2)], **kw(netns_hosts, tunnel=True))
    for p in pids:
        assert bind_arg(dx.remotecall_fetch(os.getpid, p)) == "127.0.0.1"
    # Port 127.0.0.1:P of the host is forwarded from our 127.0.0.1:P when P is free here: the
    # address the master dials, and tells the other workers, is right on the worker's host
    # too. (P may be taken here, e.g. by a socket in TIME_WAIT: then another port is used.)
    forwards = [p for p in _live_clients() if "-L" in p.cmdline()]
    assert len(forwards) == 2
    for forward in forwards:
        spec = forward.cmdline()[forward.cmdline().index("-L") + 1]
        _, local, _, remote = spec.split(":")
        assert local == remote or not ssh_manager._port_free(int(remote)), spec
    assert dx.remotecall_fetch(lambda: dx.remotecall_fetch(dx.myid, pids[0]), pids[1]) == pids[0]
    dx.rmprocs(pids)
    settles(host_a.server)


# --------------------------------------------------------------------------------------
# A fake ssh: the command line, the quoting and max_parallel, without a server
# --------------------------------------------------------------------------------------

FAKE_SSH = """\
#!{python}
# A stand-in for ssh: logs when it starts and when it "logged in", then runs the remote
# command with sh -c like sshd would (same machine, same user).
import os, sys, time
args = sys.argv[1:]
i = args.index("--")
destination, command = args[i + 1], args[i + 2]
log = os.environ["FAKE_SSH_LOG"]
with open(log, "a") as fh:
    fh.write(f"start {{os.getpid()}} {{time.monotonic()}}\\n")
if destination.startswith("denied"):
    print(f"{{destination}}: Permission denied (publickey).", file=sys.stderr)
    sys.exit(255)
time.sleep(0.2)  # the login
with open(log, "a") as fh:
    fh.write(f"login {{os.getpid()}} {{time.monotonic()}}\\n")
os.environ["SSH_CONNECTION"] = "127.0.0.1 50000 127.0.0.1 22"
os.execv("/bin/sh", ["sh", "-c", command])
"""


@pytest.fixture
def fake_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    program = tmp_path / "fake_ssh"
    program.write_text(FAKE_SSH.format(python=sys.executable))
    program.chmod(0o755)
    log = tmp_path / "ssh.log"
    log.write_text("")
    monkeypatch.setenv("FAKE_SSH_LOG", str(log))
    return str(program), log


def _max_overlap(log: Path) -> int:
    """Most sessions that were between start and login at the same moment."""
    events = []
    for line in log.read_text().splitlines():
        kind, _, when = line.split()
        events.append((float(when), 1 if kind == "start" else -1))
    depth = best = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        depth += step
        best = max(best, depth)
    return best


@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_parallel", [1, 2])
def test_max_parallel_bounds_logins_per_machine(
    fake_ssh: tuple[str, Path], max_parallel: int
) -> None:
    program, log = fake_ssh
    pids = dx.addprocs(
        [("127.0.0.1", 4)],
        ssh=program,
        multiplex=False,  # the fake has no master mode: with one, only sessions start at once
        max_parallel=max_parallel,
        exename=sys.executable,
        env=sshinfra.remote_python_env(),
    )
    assert len(pids) == 4
    assert log.read_text().count("login") == 4
    assert _max_overlap(log) <= max_parallel


@pytest.mark.timeout(60)
def test_fake_denied_host_fails_alone(fake_ssh: tuple[str, Path]) -> None:
    program, _ = fake_ssh
    with (
        pytest.warns(UserWarning, match="listen on denied-host without TLS"),
        pytest.raises(dx.LaunchError, match=r"denied-host: Permission denied") as info,
    ):
        dx.addprocs(
            ["denied-host", "127.0.0.1"],
            ssh=program,
            multiplex=False,
            exename=sys.executable,
            env=sshinfra.remote_python_env(),
        )
    assert info.value.host == "denied-host"
    assert len(dx.workers()) == 1 and dx.workers() != [1]


def _machine(spec: str) -> Machine:
    [m] = merge_machines([spec])
    return m


def test_worker_argv_shape() -> None:
    manager = SSHManager(["u@h:2222"], sshflags="-F cfg -o LogLevel=ERROR")
    argv = manager.worker_argv(_machine("u@h:2222"), {"exename": "/py", "exeflags": ("-X", "dev")})
    assert argv[:-1] == [
        "ssh", "-T", "-a", "-x", "-o", "BatchMode=yes", "-o", "ClearAllForwardings=yes",
        "-F", "cfg", "-o", "LogLevel=ERROR", "-p", "2222", "--", "u@h",
    ]  # fmt: skip
    assert argv[-1].startswith("exec sh -c ")
    assert "/py -X dev -m distexec.worker" in argv[-1]


def _run_remote_command(command: str, tmp_path: Path, ssh_connection: str) -> dict[str, Any]:
    """Run a remote command string the way sshd does, with ``bash -c``; the "worker" prints
    its cwd, argv and environment instead of serving."""
    result = subprocess.run(
        ["bash", "-c", command],
        env={"SSH_CONNECTION": ssh_connection, "HOME": str(tmp_path), "PATH": os.defpath},
        capture_output=True,
        timeout=30,
        check=True,
    )
    return json.loads(result.stdout)  # type: ignore[no-any-return]


SHOW = textwrap.dedent("""\
    import json, os, sys
    print(json.dumps({"cwd": os.getcwd(), "argv": sys.argv[1:], "env": dict(os.environ)}))
""")

command_cases = [
    # (spec, extra params, expected argv after "-m distexec.worker")
    ("u@h", {}, ["--bind", "198.18.0.9", "--allow-insecure-network"]),
    ("u@10.1.2.3", {}, ["--bind", "10.1.2.3", "--allow-insecure-network"]),
    ("h 127.0.0.1:9000", {}, ["--bind", "127.0.0.1", "--port", "9000"]),
    ("h [::1]", {}, ["--bind", "::1"]),
    ("h", {"tunnel": True}, ["--bind", "127.0.0.1"]),
    ("h 10.0.0.1", {"tunnel": True}, ["--bind", "10.0.0.1", "--allow-insecure-network"]),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("spec", "extra", "expected"), command_cases)
def test_remote_command_runs_in_a_posix_shell(
    tmp_path: Path, spec: str, extra: dict[str, Any], expected: list[str]
) -> None:
    tricky = "sp ace'quote\"dq$dollar`tick`;semi\nnewline"
    (tmp_path / "a dir").mkdir()
    params = {
        "exename": sys.executable,
        "exeflags": ("-c", SHOW),
        "dir": "~/a dir",
        "env": {"DX_TRICKY": tricky},
        **extra,
    }
    manager = SSHManager([spec])
    command = manager.worker_argv(_machine(spec), params)[-1]
    shown = _run_remote_command(command, tmp_path, "198.18.0.1 50000 198.18.0.9 22")
    assert shown["cwd"] == str(tmp_path / "a dir")
    assert shown["argv"] == ["-m", "distexec.worker", *expected]
    assert shown["env"]["DX_TRICKY"] == tricky
    assert shown["env"]["PYTHONUNBUFFERED"] == "1"


def test_consecutive_bind_ports() -> None:
    manager = SSHManager([("h 127.0.0.1:9000", 3)])
    [m] = manager.machines
    for i in range(3):
        inner = shlex.split(manager.worker_argv(m, {}, index=i)[-1])[-1]
        assert inner.endswith(f"--bind 127.0.0.1 --port {9000 + i}")


def test_without_ssh_connection_an_alias_falls_back_to_its_name(tmp_path: Path) -> None:
    manager = SSHManager(["myalias"])
    params = {"exename": sys.executable, "exeflags": ("-c", SHOW)}
    command = manager.worker_argv(_machine("myalias"), params)[-1]
    shown = _run_remote_command(command, tmp_path, "")
    assert shown["argv"][2:4] == ["--bind", "myalias"]


manager_errors = [
    (lambda: SSHManager("host"), TypeError, "not a single string"),
    (lambda: SSHManager(["a b c"]), ValueError, "invalid machine spec 'a b c'"),
    (lambda: SSHManager([("h", -1)]), ValueError, "must not be negative"),
    (lambda: SSHManager(["h"], max_parallel=0), ValueError, "max_parallel"),
    (lambda: SSHManager(["h"], tunnel="yes"), TypeError, "tunnel"),  # type: ignore[arg-type]
    (lambda: SSHManager(["h"], sshflags=3), TypeError, "sshflags"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("make", "exc", "match"), manager_errors)
def test_manager_argument_errors(make: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        make()


def test_repr_and_defaults() -> None:
    manager = SSHManager(["a", ("b:22", 2), ("a", 1)], tunnel=True)
    assert repr(manager) == "SSHManager([('a', 2), ('b:22', 2)], tunnel=True)"
    assert manager.default_params() == {
        "tunnel": True,
        "multiplex": False,
        "sshflags": (),
        "max_parallel": 10,
        "ssh": "ssh",
    }

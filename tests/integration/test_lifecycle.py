"""Adding and removing workers: ids, membership, output, cleanup, the worker's own exits."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import helpers
import psutil
import pytest

import distexec as dx

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leaked_workers")]


def test_alone_the_master_is_its_own_worker() -> None:
    assert dx.myid() == 1
    assert dx.myrole() == "master"
    assert dx.procs() == [1]
    assert dx.workers() == [1]
    assert dx.nprocs() == 1
    assert dx.nworkers() == 1


def _open_fds() -> dict[int, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the directory's own descriptor, gone by now
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")
def test_workers_added_and_removed_leave_no_descriptor_behind() -> None:
    """Every worker ever started kept its stdin pipe open in the master (its Popen lives on
    in the group's records): a descriptor per worker, until the process ran out. Removed,
    killed or retired, a worker's pipes are closed once it has exited."""
    first = dx.addprocs(2)  # a first round, for whatever opens once (the link poller)
    assert [dx.remotecall_fetch(abs, p, -p) for p in first] == first
    dx.rmprocs(first)
    before = _open_fds()
    for _ in range(3):
        pids = dx.addprocs(2)
        victim = dx.remotecall_fetch(os.getpid, pids[0])
        os.kill(victim, signal.SIGKILL)
        helpers.wait_until(lambda p=pids[0]: p not in dx.workers(), timeout=30, what="loss")
        dx.rmprocs(pids[1])
    with dx.DistributedExecutor(2) as ex:
        assert ex.submit(abs, -3).result(timeout=30) == 3

    def leaked() -> dict[int, str]:
        return {fd: what for fd, what in _open_fds().items() if fd not in before}

    try:
        helpers.wait_until(lambda: not leaked(), timeout=30, what="the descriptors to close")
    except AssertionError:
        raise AssertionError(f"left open: {leaked()}") from None


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")
def test_worker_churn_keeps_descriptors_flat() -> None:
    """Workers replaced without a pause (``max_tasks_per_child=1``): the pipes of the ones
    gone are closed as the new ones start, not only once starting pauses."""

    def pipes() -> int:
        return sum(what.startswith("pipe:") for what in _open_fds().values())

    with dx.DistributedExecutor(2, max_tasks_per_child=1) as ex:
        assert ex.submit(abs, -1).result(timeout=30) == 1
        before = pipes()
        for i in range(15):
            fs = [ex.submit(abs, -j) for j in range(4)]
            assert [f.result(timeout=30) for f in fs] == list(range(4)), i
        grown = pipes() - before
        print(f"60 calls, a worker each: {grown} more pipes open than after the first")
        assert grown <= 12  # the workers alive now and the ones starting: not one per call


def test_pids_count_up_and_are_never_reused() -> None:
    first = dx.addprocs(2)
    assert first == sorted(first) and len(first) == 2
    assert dx.workers() == first
    assert dx.nworkers() == 2 and dx.nprocs() == 3
    assert dx.procs() == [1, *first]
    dx.rmprocs(first[0])
    assert dx.workers() == [first[1]]
    second = dx.addprocs(1)
    assert second[0] > first[1]
    # Workers see the membership too, pushed after each change.
    assert dx.remotecall_fetch(dx.workers, second[0]) == [first[1], second[0]]
    assert dx.remotecall_fetch(dx.nprocs, first[1]) == 3
    dx.rmprocs(dx.workers())
    assert dx.workers() == [1]


def test_rmprocs_leaves_no_process_and_fails_fast_afterwards() -> None:
    pids = dx.addprocs(2)
    ospids = [dx.remotecall_fetch(helpers.ospid, p) for p in pids]
    t0 = time.monotonic()
    dx.rmprocs(*pids)
    print(f"rmprocs(2 workers) took {1000 * (time.monotonic() - t0):.1f} ms")
    for ospid in ospids:
        assert (
            not psutil.pid_exists(ospid) or psutil.Process(ospid).status() == psutil.STATUS_ZOMBIE
        )
    children = {c.pid for c in psutil.Process().children(recursive=True)}
    assert not children & set(ospids), "a removed worker is still our child (zombie?)"
    with pytest.raises(dx.ProcessExitedException, match="no longer part of the group"):
        dx.remotecall_fetch(abs, pids[0], 1)


def test_a_call_to_a_worker_known_dead_says_how_it_died() -> None:
    """After a worker died, a new call to it fails at once with the same WorkerDiedError its
    calls in flight got (exit code or signal, the cause), not a bare ProcessExitedException;
    after rmprocs it says the worker was removed."""
    pids = dx.addprocs(2)
    try:
        os.kill(dx.remotecall_fetch(helpers.ospid, pids[0]), signal.SIGKILL)
        helpers.wait_until(lambda: pids[0] not in dx.workers(), timeout=30, what="the loss")
        with pytest.raises(dx.WorkerDiedError, match="SIGKILL") as info:
            dx.remotecall_fetch(abs, pids[0], 1)
        assert info.value.signal == signal.SIGKILL
        with pytest.raises(dx.WorkerDiedError):
            dx.remotecall(abs, pids[0], 1)
    finally:
        dx.rmprocs(pids[1])
    with pytest.raises(dx.ProcessExitedException, match="removed by rmprocs") as removed:
        dx.remotecall_fetch(abs, pids[1], 1)
    assert not isinstance(removed.value, dx.WorkerDiedError)


def test_rmprocs_waitfor_zero_returns_a_handle() -> None:
    pids = dx.addprocs(1)
    handle = dx.rmprocs(pids, waitfor=0)
    assert handle is not None
    handle.result(timeout=30)
    assert dx.workers() == [1]


def test_calls_waiting_on_a_removed_worker_get_the_closed_error() -> None:
    (pid,) = dx.addprocs(1)
    fut = dx.remotecall(time.sleep, pid, 30)
    dx.rmprocs(pid)
    with pytest.raises(dx.ClusterClosedError):
        fut.fetch(timeout=30)


def test_rmprocs_escalates_to_sigkill_for_a_stopped_worker() -> None:
    """A stopped worker heeds neither the exit message nor SIGTERM; SIGKILL ends it."""
    (pid,) = dx.addprocs(1)
    ospid = dx.remotecall_fetch(helpers.ospid, pid)
    os.kill(ospid, signal.SIGSTOP)
    t0 = time.monotonic()
    dx.rmprocs(pid)
    print(f"stopped worker removed in {time.monotonic() - t0:.2f} s")
    assert not psutil.pid_exists(ospid)


def test_worker_ignoring_sigterm_is_killed(tmp_path: pathlib.Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    )
    (pid,) = dx.addprocs(1, env={"PYTHONPATH": str(tmp_path)})
    ospid = dx.remotecall_fetch(helpers.ospid, pid)
    assert dx.remotecall_fetch(lambda: __import__("signal").getsignal(15), pid) == 1  # SIG_IGN
    os.kill(ospid, signal.SIGSTOP)  # and deaf to the exit message
    dx.rmprocs(pid)
    assert not psutil.pid_exists(ospid)


def test_worker_death_fails_pending_calls_at_once() -> None:
    (pid,) = dx.addprocs(1)
    slow = dx.remotecall(time.sleep, pid, 30)
    with pytest.raises(dx.ProcessExitedException) as info:
        dx.remotecall_fetch(helpers.die, pid, 3)
    assert info.value.pid == pid
    assert "exited with code 3" in str(info.value)
    with pytest.raises(dx.ProcessExitedException):
        slow.fetch(timeout=10)
    with pytest.raises(dx.ProcessExitedException):
        dx.remotecall_fetch(abs, pid, 1)
    assert pid not in dx.workers()


def test_output_is_prefixed_with_the_worker_id() -> None:
    code = (
        "import distexec as dx\n"
        "(p,) = dx.addprocs(1)\n"
        "dx.remotecall_fetch(print, p, 'ping', flush=True)\n"
        "dx.rmprocs(p)\n"
    )
    out = helpers.run_python(code)
    assert "From worker 2: ping" in out.stdout


def test_plain_workers_start_without_what_they_do_not_use() -> None:
    """Start-up speed: a local worker that answered a call has not imported what only pid 1
    or a later need uses, nor argparse for LocalManager's options; pid 1 adding plain
    (non-TLS) workers never imports ssl. Modules the interpreter loads before distexec
    (site's .pth files) do not count."""
    code = (
        "import json, sys\n"
        "at_start = set(sys.modules)\n"
        "import distexec as dx\n"
        "skipped = {'argparse', 'concurrent.futures.process', 'multiprocessing', 'secrets',\n"
        "           'ssl', 'subprocess'} - at_start\n"
        "(p,) = dx.addprocs(1)\n"
        "there = dx.remotecall_fetch(lambda s: sorted(set(s) & sys.modules.keys()), p, skipped)\n"
        "dx.rmprocs(p)\n"
        "print(json.dumps({'worker': there, 'ssl here': 'ssl' in set(sys.modules) - at_start}))\n"
    )
    out = helpers.run_python(code)
    assert json.loads(out.stdout.splitlines()[-1]) == {"worker": [], "ssl here": False}


def test_invalid_keyword_and_topology_errors() -> None:
    with pytest.raises(ValueError, match="Invalid keyword argument bogus"):
        dx.addprocs(1, bogus=True)
    with pytest.raises(ValueError, match="topology"):
        dx.addprocs(1, topology="ring")
    with pytest.raises(TypeError):
        dx.addprocs("two")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        dx.addprocs(-1)


def test_only_the_master_adds_workers(cluster_one: int) -> None:
    with pytest.raises(dx.RemoteException) as info:
        dx.remotecall_fetch(dx.addprocs, cluster_one, 1)
    assert isinstance(info.value.captured.ex, dx.ClusterError)
    assert "Only process 1" in str(info.value.captured.ex)


@pytest.fixture
def cluster_one() -> object:
    (pid,) = dx.addprocs(1)
    yield pid
    dx.rmprocs(pid)


def test_cookie_can_be_read_and_set_only_while_alone() -> None:
    c = dx.cluster_cookie()
    assert isinstance(c, str) and len(c) >= 16
    (pid,) = dx.addprocs(1)
    with pytest.raises(dx.ClusterError):
        dx.cluster_cookie("another")
    assert dx.remotecall_fetch(dx.cluster_cookie, pid) == c
    dx.rmprocs(pid)
    assert dx.cluster_cookie("my-own-cookie") == "my-own-cookie"
    (pid,) = dx.addprocs(1)
    assert dx.remotecall_fetch(dx.myid, pid) == pid
    dx.rmprocs(pid)
    dx.cluster_cookie(c)


def test_cookie_never_on_a_command_line() -> None:
    (pid,) = dx.addprocs(1)
    ospid = dx.remotecall_fetch(helpers.ospid, pid)
    cmdline = " ".join(psutil.Process(ospid).cmdline())
    assert dx.cluster_cookie() not in cmdline
    assert "127.0.0.1" in cmdline  # local workers bind to loopback
    dx.rmprocs(pid)


def test_worker_exits_when_the_master_never_connects() -> None:
    env = dict(os.environ, DISTEXEC_WORKER_TIMEOUT="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "distexec.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"cookie\n")
    proc.stdin.flush()
    assert proc.stdout.readline().startswith(b"distexec-worker 127.0.0.1:")
    assert proc.wait(30) == 1
    assert b"did not connect within 1 seconds" in (proc.stderr.read() if proc.stderr else b"")


def test_worker_exits_when_its_stdin_closes_before_joining() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "distexec.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"cookie\n")
    proc.stdin.flush()
    assert proc.stdout.readline().startswith(b"distexec-worker ")
    proc.stdin.close()  # the master (or the ssh session) is gone
    assert proc.wait(10) == 0


def test_joined_worker_exits_when_master_is_killed(tmp_path: object) -> None:
    code = (
        "import distexec as dx, sys\n"
        "(p,) = dx.addprocs(1)\n"
        "import helpers\n"
        "print(dx.remotecall_fetch(helpers.ospid, p), flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(helpers.__file__))
    master = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    assert master.stdout is not None
    worker_ospid = int(master.stdout.readline())
    assert psutil.pid_exists(worker_ospid)
    master.send_signal(signal.SIGKILL)
    master.wait(10)
    helpers.wait_until(
        lambda: (
            not psutil.pid_exists(worker_ospid)
            or psutil.Process(worker_ospid).status() == psutil.STATUS_ZOMBIE
        ),
        timeout=5,
        what="the orphaned worker to exit",
    )


def test_addprocs_timeout_for_a_worker_that_never_reports() -> None:
    class Silent(dx.LocalManager):
        def launch(self, params, launched, launch_ntfy):  # type: ignore[no-untyped-def]
            proc = subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep(30)"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            with launch_ntfy:
                launched.append(dx.WorkerConfig(io=proc.stdout, process=proc))
                launch_ntfy.notify_all()

    before = dx.procs()
    t0 = time.monotonic()
    with pytest.raises(dx.WorkerTimeoutError):
        dx.addprocs(Silent(1), timeout=1)
    assert time.monotonic() - t0 < 10
    assert dx.procs() == before
    # The failed launch consumed its pid.
    (pid,) = dx.addprocs(1)
    assert pid > max(before) + 1 if len(before) > 1 else pid >= 3
    dx.rmprocs(pid)


def test_manager_launch_errors_surface_with_their_message() -> None:
    class Broken(dx.ClusterManager):
        def launch(self, params, launched, launch_ntfy):  # type: ignore[no-untyped-def]
            raise RuntimeError("no machines today")

    with pytest.raises(dx.LaunchError, match="no machines today"):
        dx.addprocs(Broken())


def test_repr_shows_state() -> None:
    from distexec import _cluster

    (pid,) = dx.addprocs(1)
    peer = _cluster.group().peer(pid)
    # Local workers are reached over AF_UNIX (a path); others show host:port.
    assert re.match(rf"<Worker id={pid} state=connected addr=(/\S+|127\.0\.0\.1:\d+)>", repr(peer))
    dx.rmprocs(pid)
    assert "state=terminated" in repr(peer)

"""Julia's macros as functions on real local workers: spawnat, everywhere, distributed, sync..."""

from __future__ import annotations

import itertools
import json
import operator
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import helpers
import psutil
import pytest
from helpers import wait_until

import __main__
import distexec as dx
from distexec._macros import (
    Task,
    async_,
    clear,
    distributed,
    everywhere,
    fetchfrom,
    nextproc,
    spawn,
    spawnat,
    splitrange,
    sync,
    timedwait,
)

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]

# A module global that workers also get (by everywhere) with values of their own.
SCALE = 100


def _main_get(name: str) -> object:
    return getattr(__main__, name, "<undefined>")


def _sleep_then(x: object, secs: float = 0.2) -> object:
    time.sleep(secs)
    return x


# ------------------------------------------------------------------------------ splitrange

# Julia's test/splitrange.jl, verbatim (lo:hi is range(lo, hi + 1)).
SPLITRANGE_CASES = [
    ((1, 11, 1), [(1, 11)]),
    ((0, 10, 1), [(0, 10)]),
    ((-1, 9, 1), [(-1, 9)]),
    ((1, 11, 2), [(1, 6), (7, 11)]),
    ((0, 10, 2), [(0, 5), (6, 10)]),
    ((-1, 9, 2), [(-1, 4), (5, 9)]),
    ((1, 11, 3), [(1, 4), (5, 8), (9, 11)]),
    ((0, 10, 3), [(0, 3), (4, 7), (8, 10)]),
    ((-1, 9, 3), [(-1, 2), (3, 6), (7, 9)]),
    ((1, 3, 3), [(1, 1), (2, 2), (3, 3)]),
    ((1, 3, 4), [(1, 1), (2, 2), (3, 3)]),
    ((0, 2, 3), [(0, 0), (1, 1), (2, 2)]),
    ((0, 2, 4), [(0, 0), (1, 1), (2, 2)]),
    ((-1, 1, 3), [(-1, -1), (0, 0), (1, 1)]),
    ((-1, 1, 4), [(-1, -1), (0, 0), (1, 1)]),
]


@pytest.mark.parametrize(("args", "expected"), SPLITRANGE_CASES)
def test_splitrange_matches_julia(
    args: tuple[int, int, int], expected: list[tuple[int, int]]
) -> None:
    assert splitrange(*args) == [range(lo, hi + 1) for lo, hi in expected]


def test_splitrange_edges() -> None:
    assert splitrange(1, 0, 3) == []  # empty
    assert splitrange(0, 9, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    with pytest.raises(ValueError, match="at least one chunk"):
        splitrange(1, 10, 0)


# ------------------------------------------------------------------------------ timedwait


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, secs: float) -> None:
        self.sleeps.append(secs)
        self.now += secs


def test_timedwait_ok_at_once_and_after_polls() -> None:
    fake = FakeClock()
    assert timedwait(lambda: True, 1.0, clock=fake.clock, sleep=fake.sleep) == "ok"
    assert fake.sleeps == []
    calls = iter([False, False, False, True])
    assert timedwait(lambda: next(calls), 10.0, 0.5, clock=fake.clock, sleep=fake.sleep) == "ok"
    assert fake.sleeps == [0.5, 0.5, 0.5]


def test_timedwait_times_out() -> None:
    fake = FakeClock()
    assert timedwait(lambda: False, 1.0, 0.25, clock=fake.clock, sleep=fake.sleep) == "timed_out"
    assert fake.now == pytest.approx(1.25)  # Julia: times out once more than secs passed


def test_timedwait_real_clock_and_errors() -> None:
    flag = threading.Event()
    threading.Timer(0.01, flag.set).start()
    assert timedwait(flag.is_set, 30, pollint=0.001) == "ok"
    with pytest.raises(ValueError, match="1 millisecond"):
        timedwait(lambda: True, 1, pollint=0.0001)

    def boom() -> bool:
        raise RuntimeError("testcb failed")

    # Julia throws the callback's exception; "error" is never returned.
    with pytest.raises(RuntimeError, match="testcb failed"):
        timedwait(boom, 1, pollint=0.001)


# ------------------------------------------------------------------------------ no workers

NO_WORKERS_PROGRAM = """
import json, operator, sys
sys.path[:0] = {paths!r}
import distexec as dx
from distexec._macros import clear, distributed, everywhere, nextproc, spawnat, sync
out = {{}}
out["workers"] = dx.workers()
out["nextproc"] = [nextproc(), nextproc()]
out["spawnat_any"] = spawnat("any", dx.myid).fetch()
out["reduce"] = distributed(range(1, 11), operator.add)(lambda i: (dx.myid(), i))
seen = []
with sync():
    distributed(range(5))(seen.append)
out["pfor"] = sorted(seen)
everywhere("hits = myid_hits = 41 + 1")
import __main__
out["everywhere"] = __main__.hits
clear("hits")
out["cleared"] = __main__.hits
print(json.dumps(out))
"""


def test_with_no_workers_everything_runs_on_pid_1(no_leaked_workers: None) -> None:
    program = NO_WORKERS_PROGRAM.format(paths=[str(REPO), str(REPO / "tests")])
    res = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["workers"] == [1]
    assert out["nextproc"] == [1, 1]
    assert out["spawnat_any"] == 1
    # One chunk, on pid 1: a left fold of (pid, i) tuples with +.
    assert out["reduce"] == [v for i in range(1, 11) for v in (1, i)]
    assert out["pfor"] == [0, 1, 2, 3, 4]  # ran here: the appends are visible
    assert out["everywhere"] == 42
    assert out["cleared"] is None  # clear() defaults to workers(), which is [1]


# ------------------------------------------------------------------------------ spawnat & co


def test_spawnat_returns_a_future_on_that_pid(cluster: list[int]) -> None:
    for w in cluster:
        fut = spawnat(w, dx.myid)
        assert isinstance(fut, dx.Future)
        assert fut.where == w
        assert fut.fetch() == w

    def f(a: int, *, p: int, fn: str) -> tuple[int, int, str]:
        return a, p, fn

    # Library parameters are positional-only: user keywords named p/fn reach f.
    assert spawnat(cluster[0], f, 1, p=2, fn="x").fetch() == (1, 2, "x")
    assert spawnat(dx.myid(), dx.myid).fetch() == 1
    assert spawnat(dx.WorkerPool(cluster), dx.myid).fetch() in cluster
    assert fetchfrom(dx.WorkerPool([cluster[1]]), dx.myid) == cluster[1]


def test_spawnat_any_is_round_robin_over_workers(cluster: list[int]) -> None:
    ws = dx.workers()
    got = [spawnat("any", dx.myid).fetch() for _ in range(2 * len(ws) + 1)]
    assert set(got) == set(ws)
    for a, b in itertools.pairwise(got):
        assert ws.index(b) == (ws.index(a) + 1) % len(ws)
    assert nextproc() in ws


def test_spawn_is_deprecated_but_works(cluster: list[int]) -> None:
    with pytest.warns(DeprecationWarning, match=r'spawnat\("any"'):
        fut = spawn(operator.mul, 6, 7)
    assert fut.fetch() == 42
    assert fut.where in cluster


def test_fetchfrom(cluster: list[int]) -> None:
    assert fetchfrom(cluster[1], dx.myid) == cluster[1]
    assert fetchfrom("any", dx.myid) in cluster
    assert fetchfrom(cluster[0], pow, 2, 5) == 32
    with pytest.raises(dx.RemoteException) as info:
        fetchfrom(cluster[0], helpers.raise_value_error, "remote boom")
    assert info.value.pid == cluster[0]
    assert isinstance(info.value.captured.ex, ValueError)
    with pytest.raises(dx.RemoteException) as info:
        fetchfrom(dx.myid(), helpers.raise_value_error, "local boom")
    assert info.value.pid == 1


BAD_TARGETS = [
    (999, ValueError, "no process with id 999"),
    ("some", ValueError, "'any'"),
    (True, TypeError, "must be an int"),
    (2.0, TypeError, "must be an int"),
]


@pytest.mark.parametrize(("p", "exc", "match"), BAD_TARGETS)
def test_spawnat_and_fetchfrom_bad_pid(
    cluster: list[int], p: object, exc: type, match: str
) -> None:
    with pytest.raises(exc, match=match):
        spawnat(p, dx.myid)  # type: ignore[arg-type]
    with pytest.raises(exc, match=match):
        fetchfrom(p, dx.myid)  # type: ignore[arg-type]


def test_interrupt_of_an_unknown_pid_is_a_clear_error(cluster: list[int]) -> None:
    with pytest.raises(ValueError, match="no process with id 4242"):
        dx.interrupt(4242)
    with pytest.raises(ValueError, match="pid 1 is this process"):
        dx.interrupt(1)  # was a bare KeyError
    assert dx.remotecall_fetch(abs, cluster[0], -1) == 1  # nothing was sent anywhere


def test_spawnat_unpicklable_argument_sends_nothing(cluster: list[int]) -> None:
    with pytest.raises(dx.SerializationError):
        spawnat(cluster[0], helpers.identity, threading.Lock())
    assert fetchfrom(cluster[0], operator.add, 1, 1) == 2  # the connection is fine


# ------------------------------------------------------------------------------ sync, async_


def test_sync_waits_for_everything_started_inside(cluster: list[int]) -> None:
    def start_more() -> dx.Future:  # a nested call in the same thread counts too
        return dx.remotecall(_sleep_then, cluster[1], "nested", 0.3)

    with sync() as block:
        a = spawnat(cluster[0], _sleep_then, "a", 0.3)
        b = start_more()
        c = dx.remotecall_wait(_sleep_then, cluster[0], "c", 0.01)
        t = async_(_sleep_then, "t", 0.3)
        d = distributed(range(4))(lambda i: time.sleep(0.05))
    for x in (a, b, c, t, d):
        assert x.done()
    assert block.tasks == (a, b, c, t, d)
    assert [a.fetch(), b.fetch(), c.fetch(), t.fetch(), d.fetch()] == [
        "a",
        "nested",
        "c",
        "t",
        None,
    ]
    # After the block nothing registers any more.
    after = spawnat(cluster[0], dx.myid)
    assert after not in block.tasks
    after.wait()


def test_sync_collects_failures_in_one_exception_group(cluster: list[int]) -> None:
    with pytest.raises(ExceptionGroup) as info, sync():
        spawnat(cluster[0], helpers.raise_value_error, "first")
        spawnat(cluster[1], dx.myid)
        async_(helpers.raise_value_error, "local task")
        spawnat(cluster[1], helpers.raise_value_error, "second")
    excs = info.value.exceptions
    assert len(excs) == 3
    assert "3 of 4 tasks failed" in str(info.value)
    assert isinstance(excs[0], dx.RemoteException) and excs[0].pid == cluster[0]
    assert str(excs[0].captured.ex) == "first"
    assert isinstance(excs[1], ValueError) and str(excs[1]) == "local task"
    assert isinstance(excs[2], dx.RemoteException) and excs[2].pid == cluster[1]

    # except* sees the members.
    caught = []
    try:
        with sync():
            spawnat(cluster[0], helpers.raise_value_error, "x")
    except* dx.RemoteException as group:
        caught.extend(group.exceptions)
    assert len(caught) == 1


def test_nested_sync_blocks_wait_for_their_own(cluster: list[int]) -> None:
    with sync() as outer:
        o = spawnat(cluster[0], _sleep_then, "outer", 0.3)
        with sync() as inner:
            i = spawnat(cluster[1], _sleep_then, "inner", 0.05)
        assert i.done()
        assert inner.tasks == (i,)
    assert outer.tasks == (o,)
    assert o.done()


def test_inner_sync_failure_propagates_through_the_outer(cluster: list[int]) -> None:
    with pytest.raises(ExceptionGroup) as info, sync() as outer:
        slow = spawnat(cluster[0], _sleep_then, "slow", 0.3)
        with sync():
            spawnat(cluster[1], helpers.raise_value_error, "inner")
    assert slow.done()  # the outer block waited before letting the error through
    assert outer.tasks == (slow,)
    assert info.value.exceptions[0].captured.ex.args == ("inner",)


def test_sync_body_exception_still_waits_then_raises(cluster: list[int]) -> None:
    with pytest.raises(KeyError) as info, sync():
        slow = spawnat(cluster[0], _sleep_then, "slow", 0.3)
        spawnat(cluster[1], helpers.raise_value_error, "also failed")
        raise KeyError("body")
    assert slow.done()
    notes = getattr(info.value, "__notes__", [])
    assert any("1 of its 2 tasks failed too" in n and "also failed" in n for n in notes)


def test_sync_does_not_count_calls_from_other_threads(cluster: list[int]) -> None:
    futs: list[dx.Future] = []
    with sync() as block:
        th = threading.Thread(target=lambda: futs.append(spawnat(cluster[0], dx.myid)))
        th.start()
        th.join()
    assert block.tasks == ()
    assert futs[0].fetch() == cluster[0]


def test_sync_block_is_not_reentrant() -> None:
    block = sync()
    with block:
        pass
    with pytest.raises(RuntimeError, match="entered twice"), block:
        pass


def test_async_task_handle(cluster: list[int]) -> None:
    main_thread = threading.get_ident()
    t = async_(threading.get_ident)
    assert isinstance(t, Task)
    assert t.fetch(timeout=30) != main_thread
    assert t.isready() and dx.isready(t)
    assert dx.fetch(t) == t.result()
    bad = async_(helpers.raise_value_error, "nope")
    with pytest.raises(ValueError, match="nope"):
        bad.wait(timeout=30)
    with pytest.raises(ValueError, match="nope"):
        bad.fetch()
    with pytest.raises(TypeError):
        async_(42)  # type: ignore[arg-type]


def test_async_task_calls_belong_to_the_enclosing_sync(cluster: list[int]) -> None:
    started: list[dx.Future] = []

    def starter() -> None:
        started.append(spawnat(cluster[1], _sleep_then, "from task", 0.3))

    with sync() as block:
        t = async_(starter)
    assert started[0].done()
    assert block.tasks == (t, started[0])


# ------------------------------------------------------------------------------ Ctrl-C

CTRL_C_PROGRAM = """
import os, pathlib, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
import distexec as dx
from distexec._macros import spawnat, sync

def spin(marker):
    pathlib.Path(marker).touch()
    while True:
        time.sleep(0.01)

if __name__ == "__main__":
    folder = sys.argv[1]
    pids = dx.addprocs(2)
    print("WORKERS", *[dx.remotecall_fetch(os.getpid, p) for p in pids], flush=True)
    futs = []
    try:
        with sync():
            futs = [spawnat(p, spin, os.path.join(folder, f"started-{p}")) for p in pids]
            while not all(os.path.exists(os.path.join(folder, f"started-{p}")) for p in pids):
                time.sleep(0.01)
            print("READY", flush=True)
            while sys.argv[2] == "body":  # Ctrl-C in the body rather than in the wait
                time.sleep(0.01)
    except KeyboardInterrupt:
        states = []
        for f in futs:
            try:
                f.result(timeout=20)
                states.append("finished")
            except dx.RemoteException as exc:
                states.append(type(exc.captured.ex).__name__)
            except Exception as exc:
                states.append(repr(exc))
        print("INTERRUPTED", *states, flush=True)
        raise
"""


@pytest.mark.parametrize("where", ["wait", "body"])
def test_ctrl_c_in_sync_interrupts_the_remote_calls(
    tmp_path: Path, where: str, no_leaked_workers: None
) -> None:
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_PROGRAM)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), where],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        worker_line = proc.stdout.readline().split()
        assert worker_line and worker_line[0] == "WORKERS", (
            proc.stderr.read() if proc.stderr else ""
        )
        ospids = [int(x) for x in worker_line[1:]]
        assert proc.stdout.readline().strip() == "READY"
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "INTERRUPTED KeyboardInterrupt KeyboardInterrupt" in out, (out, err)
    assert "KeyboardInterrupt" in err
    assert proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT, 1), proc.returncode
    assert elapsed < 15, elapsed

    def workers_gone() -> bool:
        for pid in ospids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                pass
        return True

    wait_until(workers_gone, timeout=15, what="the workers of the interrupted program to exit")


# ------------------------------------------------------------------------------ distributed


def test_distributed_with_reducer(cluster: list[int]) -> None:
    assert distributed(range(1, 11), operator.add)(lambda i: i) == 55
    # Non-commutative reducers keep the order (left fold per chunk, chunks in order).
    assert distributed(range(10), operator.add)(lambda i: [i]) == list(range(10))
    assert distributed("abcdef", operator.add)(str.upper) == "ABCDEF"
    assert distributed([3, 1, 2], max)(lambda x: -x) == -1
    assert distributed(range(1), operator.add)(lambda i: i + 5) == 5  # fewer items than workers


def test_distributed_chunk_i_runs_on_workers_i(cluster: list[int]) -> None:
    ws = dx.workers()
    got = distributed(range(11), operator.add)(lambda i: [(dx.myid(), i)])
    chunks = splitrange(0, 10, len(ws))
    expected = [(ws[k], i) for k, c in enumerate(chunks) for i in c]
    assert got == expected


def test_distributed_as_a_decorator(cluster: list[int]) -> None:
    @distributed(range(1, 11), operator.add)
    def total(i: int) -> int:
        return i * i

    assert total == 385

    with sync() as block:

        @distributed(range(6))
        def loop(i: int) -> None:
            assert 0 <= i < 6

    assert isinstance(loop, Task)
    assert block.tasks == (loop,)


def test_distributed_without_reducer_returns_at_once_and_sync_waits(cluster: list[int]) -> None:
    everywhere("loop_seen = []")
    with sync() as block:
        task = distributed(range(20))(lambda i: (time.sleep(0.01), __main__.loop_seen.append(i)))
        assert isinstance(task, Task)
        assert not task.done()  # it returned at once
    assert task.done() and task.fetch() is None
    assert block.tasks == (task,)
    seen = {w: fetchfrom(w, _main_get, "loop_seen") for w in cluster}
    assert sorted(i for part in seen.values() for i in part) == list(range(20))
    for part in seen.values():  # one contiguous chunk per worker
        assert sorted(part) == list(range(min(part), max(part) + 1))
    everywhere("del loop_seen")


def test_distributed_errors(cluster: list[int]) -> None:
    with pytest.raises(dx.RemoteException) as info:
        distributed(range(10), operator.add)(lambda i: 1 // (i - 7))
    assert isinstance(info.value.captured.ex, ZeroDivisionError)
    assert info.value.pid == dx.workers()[-1]  # 7 is in the last chunk

    task = distributed(range(10))(lambda i: 1 // (i % 5 - 4))  # fails in both chunks
    with pytest.raises(ExceptionGroup) as group:
        task.wait(timeout=30)
    assert len(group.value.exceptions) == 2
    assert all(isinstance(e, dx.RemoteException) for e in group.value.exceptions)

    with pytest.raises(ExceptionGroup) as nested, sync():
        distributed(range(4))(lambda i: 1 // 0)
    (inner,) = nested.value.exceptions  # the loop's own group, as Julia nests them
    assert isinstance(inner, ExceptionGroup)


BAD_ITERABLES = [
    (lambda: (i for i in range(3)), "generator"),
    (lambda: {1, 2, 3}, "set"),
    (lambda: {"a": 1}, "dict"),
    (lambda: iter([1, 2]), "list_iterator"),
    (lambda: 5, "int"),
]


@pytest.mark.parametrize(("make", "name"), BAD_ITERABLES)
def test_distributed_needs_a_sized_sequence(make: object, name: str) -> None:
    with pytest.raises(TypeError, match=rf"got {name}\. Materialise it first"):
        distributed(make())  # type: ignore[operator]


def test_distributed_empty_and_bad_bodies(cluster: list[int]) -> None:
    with pytest.raises(ValueError, match="empty collection"):
        distributed([], operator.add)(lambda i: i)
    empty = distributed(range(0))(lambda i: i)
    assert empty.done() and empty.fetch() is None
    with pytest.raises(TypeError, match="loop body"):
        distributed(range(3))(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="reducer"):
        distributed(range(3), 42)(lambda i: i)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ everywhere


def _mark(token: str) -> None:
    __main__.mark = (token, dx.myid())  # type: ignore[attr-defined]


def test_everywhere_source_runs_in_main_of_every_process(cluster: list[int]) -> None:
    assert everywhere("import json as json_everywhere\ndef sq(x):\n    return x * x\n") is None
    for w in cluster:
        # By name, from a lambda and from later source.
        assert dx.remotecall_fetch(lambda: __main__.sq(3), w) == 9
        assert dx.remotecall_fetch(lambda: "json_everywhere" in vars(__main__), w)
    assert __main__.sq(4) == 16  # type: ignore[attr-defined]
    everywhere("y_everywhere = sq(5)")
    assert [fetchfrom(w, _main_get, "y_everywhere") for w in cluster] == [25, 25]
    everywhere("del sq, y_everywhere, json_everywhere")


def test_everywhere_callable_runs_on_every_process(cluster: list[int]) -> None:
    everywhere(_mark, "t1")
    assert __main__.mark == ("t1", 1)  # type: ignore[attr-defined]
    for w in cluster:
        assert fetchfrom(w, _main_get, "mark") == ("t1", w)
    everywhere(_mark, "t2", procs=[cluster[0]])
    assert __main__.mark == ("t1", 1)  # type: ignore[attr-defined]
    assert fetchfrom(cluster[0], _main_get, "mark") == ("t2", cluster[0])
    assert fetchfrom(cluster[1], _main_get, "mark") == ("t1", cluster[1])

    def setup() -> None:  # a plain call of a def runs it (it is not a decorator line)
        _mark("t3")

    everywhere(setup)
    assert fetchfrom(cluster[1], _main_get, "mark") == ("t3", cluster[1])
    everywhere("del mark")


def test_everywhere_duplicates_run_repeatedly(cluster: list[int]) -> None:
    p = cluster[0]
    everywhere("hits = []")
    everywhere("hits.append(1)", procs=[dx.myid(), p, dx.myid(), dx.myid(), p])
    assert __main__.hits == [1, 1, 1]  # type: ignore[attr-defined]
    assert fetchfrom(p, _main_get, "hits") == [1, 1]
    assert fetchfrom(cluster[1], _main_get, "hits") == []
    everywhere("del hits")


def test_everywhere_single_pid_returns_the_value(cluster: list[int]) -> None:
    w = cluster[1]
    assert everywhere("from distexec import myid\nmyid() * 10", procs=w) == w * 10
    assert everywhere(dx.myid, procs=w) == w
    assert everywhere("1 + 1", procs=dx.myid()) == 2
    assert everywhere("1 + 1", procs=[w]) is None  # the list form returns nothing
    with pytest.raises(dx.RemoteException) as info:  # a plain one, not a group
        everywhere("raise KeyError('single')", procs=w)
    assert info.value.pid == w


def test_everywhere_errors_raise_one_exception_group(cluster: list[int]) -> None:
    src = f"from distexec import myid\nif myid() in (1, {cluster[1]}): raise ValueError(myid())"
    with pytest.raises(ExceptionGroup) as info:
        everywhere(src)
    excs = info.value.exceptions
    assert [type(e) for e in excs] == [dx.RemoteException, dx.RemoteException]
    assert sorted(e.pid for e in excs) == [1, cluster[1]]  # the local one is wrapped too
    assert all(isinstance(e.captured.ex, ValueError) for e in excs)
    assert "2 of 3 runs failed" in str(info.value)


def test_everywhere_syntax_error_before_anything_runs(cluster: list[int]) -> None:
    with pytest.raises(SyntaxError):
        everywhere("never_defined = 1\ndef (:")
    assert _main_get("never_defined") == "<undefined>"
    assert fetchfrom(cluster[0], _main_get, "never_defined") == "<undefined>"


def test_everywhere_unpicklable_sends_and_runs_nothing(cluster: list[int]) -> None:
    ran: list[int] = []
    with pytest.raises(dx.SerializationError):
        everywhere(lambda lock: ran.append(1), threading.Lock())
    assert ran == []


def test_everywhere_bad_arguments(cluster: list[int]) -> None:
    with pytest.raises(ValueError, match="no process with id 999"):
        everywhere("x_bad = 1", procs=[cluster[0], 999])
    assert fetchfrom(cluster[0], _main_get, "x_bad") == "<undefined>"
    with pytest.raises(TypeError, match="takes no arguments"):
        everywhere("x = 1", 2)
    with pytest.raises(TypeError):
        everywhere(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        everywhere("x = 1", procs="2")  # type: ignore[arg-type]


def test_everywhere_decorator_defines_by_value_in_main(cluster: list[int]) -> None:
    everywhere("SCALE = myid_scale = __import__('distexec').myid()")

    @everywhere
    def scaled(x: int) -> tuple[int, str]:
        # SCALE is defined on the workers already: theirs is used. helpers is not: it comes along.
        return x * SCALE, helpers.__name__

    assert callable(scaled)
    assert __main__.scaled is scaled  # type: ignore[attr-defined]
    for w in cluster:
        assert dx.remotecall_fetch(lambda: __main__.scaled(2), w) == (2 * w, "helpers")
        assert everywhere("scaled(1)", procs=w) == (w, "helpers")
        assert dx.remotecall_fetch(lambda: __main__.scaled.__module__, w) == "__main__"
    everywhere("del SCALE, scaled, myid_scale")


def main() -> str:  # a worker's __main__ starts with a main() of its own (distexec.worker's)
    return "user main"


def test_everywhere_decorator_beats_the_workers_own_names(cluster: list[int]) -> None:
    @everywhere
    def run_main() -> str:
        return main()

    assert [fetchfrom(w, lambda: __main__.run_main()) for w in cluster] == ["user main"] * 2
    everywhere("del run_main")


def test_everywhere_decorator_with_procs(cluster: list[int]) -> None:
    @everywhere(procs=[cluster[0]])
    def only_first() -> str:
        return "here"

    assert fetchfrom(cluster[0], lambda: __main__.only_first()) == "here"
    assert fetchfrom(cluster[1], _main_get, "only_first") == "<undefined>"
    assert _main_get("only_first") == "<undefined>"
    everywhere("del only_first", procs=[cluster[0]])

    with pytest.raises(TypeError, match="made with def"):

        @everywhere
        class NotAFunction:
            pass


def test_clear_sets_globals_to_none(cluster: list[int]) -> None:
    everywhere("big = list(range(1000)); small = 1")
    clear("big")  # default: workers()
    for w in cluster:
        assert fetchfrom(w, _main_get, "big") is None
        assert fetchfrom(w, _main_get, "small") == 1
    assert __main__.big == list(range(1000))  # type: ignore[attr-defined]
    clear(["small", "not_defined_anywhere"], cluster[0])
    assert fetchfrom(cluster[0], _main_get, "small") is None
    assert fetchfrom(cluster[0], _main_get, "not_defined_anywhere") == "<undefined>"
    assert fetchfrom(cluster[1], _main_get, "small") == 1
    clear(("big", "small"), [1])
    assert __main__.big is None and __main__.small is None  # type: ignore[attr-defined]
    everywhere("del big, small")


def test_clear_other_module_and_errors(cluster: list[int]) -> None:
    everywhere("import helpers; helpers.CLEAR_ME = 5")
    clear("CLEAR_ME", module="helpers")
    assert fetchfrom(cluster[0], lambda: __import__("helpers").CLEAR_ME) is None
    with pytest.raises(ValueError, match="not a global name"):
        clear("not a name")
    with pytest.raises(ValueError, match="no process with id 999"):
        clear("x", 999)
    with pytest.raises(ExceptionGroup) as info:
        clear("x", module="no_such_module_here")
    assert all(isinstance(e, dx.RemoteException) for e in info.value.exceptions)
    assert len(info.value.exceptions) == len(cluster)


# ------------------------------------------------------------------------------ membership


def test_new_workers_do_not_replay_and_removed_ones_fail_fast(
    cluster: list[int], no_leaked_workers: None
) -> None:
    everywhere("defined_before = 1")
    (extra,) = dx.addprocs(1)
    try:
        assert fetchfrom(extra, _main_get, "defined_before") == "<undefined>"
        everywhere("defined_before = 2", procs=[extra])
        assert fetchfrom(extra, _main_get, "defined_before") == 2
    finally:
        dx.rmprocs(extra)
    with pytest.raises(dx.ProcessExitedException):
        spawnat(extra, dx.myid)
    with pytest.raises(dx.ProcessExitedException):
        everywhere("x = 1", procs=[extra])
    with pytest.raises(dx.ProcessExitedException):
        dx.interrupt(extra)
    everywhere("del defined_before")


def test_remote_calls_made_by_everywhere_are_not_left_to_an_enclosing_sync(
    cluster: list[int],
) -> None:
    with sync() as block:
        with pytest.raises(ExceptionGroup):
            everywhere("raise ValueError('once')", procs=cluster)
        assert distributed(range(4), operator.add)(lambda i: i) == 6
        clear("nothing_here")
    assert block.tasks == ()  # nothing to wait for twice, nothing raised twice

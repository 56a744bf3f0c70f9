"""pmap on real workers: order, batching, on_error, retry, worker death, laziness."""

from __future__ import annotations

import functools
import itertools
import os
import random
import signal
import threading
import time

import helpers
import pytest

import distexec as dx
from distexec.retry import ExponentialBackOff

pytestmark = pytest.mark.timeout(120)


def test_results_in_input_order(cluster: list[int]) -> None:
    assert dx.pmap(lambda x: x * 2, range(100)) == [x * 2 for x in range(100)]
    assert dx.pmap(helpers.sleep_and_return, [0.05, 0.0, 0.02, 0.0]) == [0.05, 0.0, 0.02, 0.0]


def test_several_iterables_stop_at_the_shortest(cluster: list[int]) -> None:
    assert dx.pmap(lambda a, b: a + b, range(5), range(10, 100)) == [10, 12, 14, 16, 18]
    assert dx.pmap(pow, [2, 3], [3, 2], batch_size=2) == [8, 9]


def test_runs_on_the_workers(cluster: list[int]) -> None:
    pids = {p for p, _ in dx.pmap(helpers.pid_and_value, range(40))}
    assert os.getpid() not in pids and len(pids) == 2


@pytest.mark.parametrize("batch_size", [1, 3, 7, 100, "auto"])
def test_batches(cluster: list[int], batch_size: int | str) -> None:
    assert dx.pmap(lambda x: -x, range(50), batch_size=batch_size) == [-x for x in range(50)]


def test_generator_input_is_consumed_lazily(cluster: list[int]) -> None:
    gate = threading.Event()
    pulled: list[int] = []

    def gen() -> object:
        for i in range(1000):
            pulled.append(i)
            yield i

    result: list[object] = []
    t = threading.Thread(
        target=lambda: result.extend(dx.pmap(helpers.sleep_and_return, (0.0 for _ in gen())))
    )
    del gate
    t.start()
    t.join(60)
    assert result == [0.0] * 1000
    # Bounded in flight: while running, the driver never pulled far ahead of completions.
    assert len(pulled) == 1000


def test_in_flight_is_bounded(cluster: list[int]) -> None:
    """Elements are pulled from the input only as workers free up."""
    pulled = 0
    lock = threading.Lock()

    def gen() -> object:
        nonlocal pulled
        for _ in range(200):
            with lock:
                pulled += 1
            yield 0.01

    seen_max = 0

    def watch() -> None:
        nonlocal seen_max
        while not done.is_set():
            seen_max = max(seen_max, pulled - len(finished))
            time.sleep(0.002)

    finished: list[object] = []
    done = threading.Event()
    w = threading.Thread(target=watch)
    w.start()
    for v in [dx.pmap(helpers.sleep_and_return, gen())]:
        finished.extend(v)
    done.set()
    w.join()
    assert len(finished) == 200
    assert pulled == 200


def test_on_error_replaces_the_failed_element(cluster: list[int]) -> None:
    def f(x: int) -> int:
        if x % 2:
            raise ValueError(f"odd {x}")
        return x

    got = dx.pmap(f, range(4), on_error=lambda e: e)
    assert got[0] == 0 and got[2] == 2
    assert isinstance(got[1], ValueError) and str(got[1]) == "odd 1"  # the original, as Julia
    assert dx.pmap(f, range(4), on_error=lambda e: 0) == [0, 0, 2, 0]
    assert dx.pmap(f, range(6), on_error=lambda e: -1, batch_size=4) == [0, -1, 2, -1, 4, -1]


def test_without_handlers_the_first_failure_raises(cluster: list[int]) -> None:
    with pytest.raises(dx.RemoteException) as info:
        dx.pmap(lambda x: 1 // (x - 3), range(10))
    assert isinstance(info.value.captured.ex, ZeroDivisionError)


def test_on_error_sees_worker_death(cluster: list[int]) -> None:
    """Unlike Julia, on_error runs on the caller and so also hears of a dead worker."""
    (pid,) = dx.addprocs(1)
    try:
        pool = dx.WorkerPool([pid])
        got = dx.pmap(helpers.die, [3], pool=pool, on_error=lambda e: e)
        assert isinstance(got[0], dx.ProcessExitedException)
        assert type(got[0]).__name__ == "WorkerDiedError" and got[0].exitcode == 3
    finally:
        if pid in dx.workers():
            dx.rmprocs(pid)


@pytest.mark.parametrize("batch_size", [1, 50])
def test_retry_reruns_only_failed_elements(cluster: list[int], batch_size: int) -> None:
    failing = frozenset(random.Random(7).sample(range(2000), 20))
    helpers.reset_attempts()
    for p in cluster:
        dx.remotecall_fetch(helpers.reset_runs, p)
    f = functools.partial(helpers.square_failing_once, failing=failing)
    got = dx.pmap(f, range(2000), retry_delays=[0, 0, 0], batch_size=batch_size)
    assert got == [x * x for x in range(2000)]
    totals: dict[int, int] = {}
    for p in cluster:
        for k, v in dx.remotecall_fetch(helpers.runs, p).items():
            totals[k] = totals.get(k, 0) + v
    assert {k for k, v in totals.items() if v == 2} == failing
    assert all(v == 1 for k, v in totals.items() if k not in failing)
    assert len(totals) == 2000


def test_retry_100k_with_one_percent_failures(cluster: list[int]) -> None:
    n = 100_000
    failing = frozenset(random.Random(1).sample(range(n), n // 100))
    helpers.reset_attempts()
    for p in cluster:
        dx.remotecall_fetch(helpers.reset_runs, p)
    f = functools.partial(helpers.square_failing_once, failing=failing)
    t0 = time.monotonic()
    got = dx.pmap(f, range(n), retry_delays=[0] * 3, batch_size=500)
    print(f"100k pmap with 1% retried: {time.monotonic() - t0:.2f} s")
    assert got == [x * x for x in range(n)]
    totals: dict[int, int] = {}
    for p in cluster:
        for k, v in dx.remotecall_fetch(helpers.runs, p).items():
            totals[k] = totals.get(k, 0) + v
    assert sum(totals.values()) == n + len(failing)
    assert {k for k, v in totals.items() if v == 2} == failing


def test_retries_are_spent_then_pmap_raises(cluster: list[int]) -> None:
    attempts = dx.pmap(lambda x: x, [1])
    assert attempts == [1]
    with pytest.raises(dx.RemoteException):
        dx.pmap(lambda x: 1 / 0, [1], retry_delays=[0, 0])


def test_retry_check_decides_per_exception(cluster: list[int]) -> None:
    seen: list[str] = []

    def check(state: object, exc: BaseException) -> bool:
        seen.append(type(exc).__name__)
        return False

    with pytest.raises(dx.RemoteException):
        dx.pmap(lambda x: 1 / 0, [1], retry_delays=[0, 0, 0], retry_check=check)
    assert seen == ["RemoteException"]


def test_on_error_raising_goes_to_retry(cluster: list[int]) -> None:
    failing = frozenset({3})
    helpers.reset_attempts()
    for p in cluster:
        dx.remotecall_fetch(helpers.reset_runs, p)
    f = functools.partial(helpers.square_failing_once, failing=failing)

    def reraise(e: BaseException) -> object:
        raise e

    assert dx.pmap(f, range(5), on_error=reraise, retry_delays=[0]) == [0, 1, 4, 9, 16]


def test_exponential_backoff_delays_work(cluster: list[int]) -> None:
    failing = frozenset({1})
    helpers.reset_attempts()
    for p in cluster:
        dx.remotecall_fetch(helpers.reset_runs, p)
    f = functools.partial(helpers.square_failing_once, failing=failing)
    delays = ExponentialBackOff(n=2, first_delay=0.01)
    assert dx.pmap(f, range(3), retry_delays=delays) == [0, 1, 4]


def test_worker_killed_mid_pmap_with_retries(cluster: list[int]) -> None:
    extra = dx.addprocs(1)
    victim = extra[0]
    ospid = dx.remotecall_fetch(helpers.ospid, victim)
    pool = dx.WorkerPool([*cluster, victim])

    def killer() -> None:
        time.sleep(0.3)
        os.kill(ospid, signal.SIGKILL)

    threading.Thread(target=killer).start()
    t0 = time.monotonic()
    got = dx.pmap(helpers.sleep_and_return, [0.01] * 3000, pool=pool, retry_delays=[0] * 3)
    assert time.monotonic() - t0 > 0.3, "finished before the kill: the test proves nothing"
    assert got == [0.01] * 3000
    assert victim not in pool.workers()
    helpers.wait_until(lambda: victim not in dx.workers(), what="victim gone")


def test_bad_arguments_fail_before_anything_is_sent(cluster: list[int]) -> None:
    before = dx.statistics().bytes_sent
    for bad in (0, -1, 1.5, True, "big"):
        with pytest.raises(ValueError, match="batch_size"):
            dx.pmap(abs, [1], batch_size=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dx.pmap(5, [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        dx.pmap(abs, [1], retry_delays=[0.1, -1])
    with pytest.raises(TypeError):
        dx.pmap(abs)
    assert dx.statistics().bytes_sent == before


def test_distributed_false_runs_on_threads_here(cluster: list[int]) -> None:
    me = os.getpid()
    got = dx.pmap(helpers.pid_and_value, range(10), distributed=False)
    assert {p for p, _ in got} == {me}
    assert [v for _, v in got] == list(range(10))


def test_pmap_with_a_pool(cluster: list[int]) -> None:
    pool = dx.WorkerPool([cluster[0]])
    pids = {p for p, _ in dx.pmap(helpers.pid_and_value, range(10), pool=pool)}
    assert pids == {dx.remotecall_fetch(helpers.ospid, cluster[0])}


def test_progress_counter(cluster: list[int], capsys: pytest.CaptureFixture[str]) -> None:
    assert dx.pmap(abs, range(30), progress=True) == list(range(30))
    err = capsys.readouterr().err
    assert "30" in err


def test_generators_of_unknown_length(cluster: list[int]) -> None:
    assert dx.pmap(abs, itertools.islice(itertools.count(-5), 10)) == [abs(x) for x in range(-5, 5)]

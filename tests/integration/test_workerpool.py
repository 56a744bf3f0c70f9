"""WorkerPool, CachingPool, default_worker_pool and remote on real workers."""

from __future__ import annotations

import os
import signal

import helpers
import pytest

import distexec as dx

pytestmark = pytest.mark.timeout(90)


def test_pool_lends_and_takes_back(cluster: list[int]) -> None:
    pool = dx.WorkerPool(cluster)
    assert len(pool) == 2 and pool.isready()
    a = pool.take()
    b = pool.take()
    assert {a, b} == set(cluster) and not pool.isready()
    with pytest.raises(TimeoutError):
        pool.take(timeout=0.05)
    pool.put(a)
    assert pool.take() == a
    pool.put(a)
    pool.put(b)
    assert pool.workers() == sorted(cluster)
    assert "WorkerPool" in repr(pool)


def test_calls_accept_a_pool(cluster: list[int]) -> None:
    pool = dx.WorkerPool(cluster)
    assert dx.remotecall_fetch(dx.myid, pool) in cluster
    fut = dx.remotecall(dx.myid, pool)
    assert fut.fetch() in cluster
    helpers.wait_until(lambda: len(pool.workers()) == 2 and pool.isready(), what="put back")
    assert dx.remotecall_wait(dx.myid, pool).fetch() in cluster
    dx.remote_do(print, pool, "via pool")
    assert dx.remote(dx.myid, pool)() in cluster
    assert dx.remote(lambda x: x + 1)(1) == 2  # default pool


def test_default_pool_holds_every_worker_and_new_ones(cluster: list[int]) -> None:
    pool = dx.default_worker_pool()
    assert set(cluster) <= set(pool.workers())
    (extra,) = dx.addprocs(1)
    assert extra in pool.workers()
    dx.rmprocs(extra)
    assert extra not in pool.workers()


def test_a_dead_worker_leaves_every_pool(cluster: list[int]) -> None:
    (pid,) = dx.addprocs(1)
    p1 = dx.WorkerPool([pid, *cluster])
    p2 = dx.CachingPool([pid])
    ospid = dx.remotecall_fetch(helpers.ospid, pid)
    os.kill(ospid, signal.SIGKILL)
    helpers.wait_until(
        lambda: pid not in p1.workers() and pid not in p2.workers(), what="pool cleanup"
    )
    assert pid not in dx.default_worker_pool().workers()
    with pytest.raises(dx.ClusterError, match="No active worker"):
        p2.take(timeout=1)


def test_caching_pool_ships_a_closure_once_per_worker(cluster: list[int]) -> None:
    np = pytest.importorskip("numpy")
    big = np.ones(50_000_000 // 8)  # 50 MB

    def uses_big(i: int) -> float:
        return float(big[0]) + i

    pool = dx.CachingPool(cluster)
    before = dx.statistics().bytes_sent
    got = [dx.remotecall_fetch(uses_big, pool, i) for i in range(100)]
    sent = dx.statistics().bytes_sent - before
    assert got == [1.0 + i for i in range(100)]
    assert 2 * big.nbytes <= sent < 2 * big.nbytes + 1_000_000, sent
    # After clear() the function is shipped again.
    pool.clear()
    before = dx.statistics().bytes_sent
    dx.remotecall_fetch(uses_big, pool, 0)
    assert dx.statistics().bytes_sent - before >= big.nbytes


def test_a_plain_pool_ships_every_time(cluster: list[int]) -> None:
    payload = b"x" * 200_000

    def f() -> int:
        return len(payload)

    pool = dx.WorkerPool(cluster)
    before = dx.statistics().bytes_sent
    for _ in range(4):
        dx.remotecall_fetch(f, pool)
    assert dx.statistics().bytes_sent - before >= 4 * len(payload)


def test_a_pool_passed_to_a_worker_works_there(cluster: list[int]) -> None:
    a, b = cluster
    pool = dx.WorkerPool([b])

    def use(p: dx.WorkerPool) -> int:
        return dx.remotecall_fetch(dx.myid, p)

    assert dx.remotecall_fetch(use, a, pool) == b


def test_empty_default_pool_lends_the_master() -> None:
    from distexec import workerpool

    pool = dx.WorkerPool()
    pool._is_default = True
    assert pool.take() == 1
    with pytest.raises(dx.ClusterError):
        dx.WorkerPool().take()
    assert workerpool.default_worker_pool() is workerpool.default_worker_pool()

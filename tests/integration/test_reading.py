"""Who reads a link: a blocking caller reads its own reply; a quiet link is still watched.

A thread blocked in ``remotecall_fetch`` on a quiet link reads the link itself instead of
waiting for a reader thread to hand it the reply (one thread wake-up less per call). These
tests check what that must not break: messages that arrive while nobody waits, a worker
that dies while its link is quiet, replies too large to read that way, many callers at once,
and a ``KeyboardInterrupt`` in the middle of a read.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import helpers
import pytest

import distexec as dx
from distexec import _cluster

pytestmark = pytest.mark.timeout(60)


def _conn(pid: int) -> object:
    peer = _cluster.group().peer(pid)
    assert peer is not None and peer.conn is not None
    return peer.conn


def _reading(pid: int) -> int:
    return _conn(pid).reading  # type: ignore[attr-defined,no-any-return]


def test_a_blocking_caller_reads_its_own_reply(cluster: list[int]) -> None:
    w = cluster[0]
    for i in range(50):
        assert dx.remotecall_fetch(helpers.identity, w, i) == i
    helpers.wait_until(lambda: _reading(w) == _cluster._IDLE, what="a quiet link")
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(dx.remotecall_fetch(time.sleep, w, 0.5)))
    t.start()
    helpers.wait_until(lambda: _reading(w) == _cluster._CALLER, what="the caller reading")
    t.join(10)
    assert seen == [None]
    assert _reading(w) == _cluster._IDLE


def _put_later(ch: dx.RemoteChannel, value: object) -> None:
    time.sleep(0.2)
    ch.put(value)


def test_a_call_from_a_worker_on_a_quiet_link_is_served(cluster: list[int]) -> None:
    w = cluster[1]
    ch = dx.RemoteChannel(lambda: dx.Channel(1))  # lives on the master
    assert dx.remotecall_fetch(helpers.identity, w, 1) == 1
    helpers.wait_until(lambda: _reading(w) == _cluster._IDLE, what="a quiet link")
    dx.remote_do(_put_later, w, ch, "hello")
    assert ch.take() == "hello"  # the worker's put crossed a link nobody was reading


def test_a_worker_killed_while_its_link_is_quiet_is_noticed(no_leaked_workers: None) -> None:
    (w,) = dx.addprocs(1)
    try:
        ospid = dx.remotecall_fetch(helpers.ospid, w)
        helpers.wait_until(lambda: _reading(w) == _cluster._IDLE, what="a quiet link")
        os.kill(ospid, signal.SIGKILL)
        helpers.wait_until(lambda: w not in dx.workers(), what="the loss to be noticed")
        with pytest.raises(dx.ProcessExitedException):
            dx.remotecall_fetch(helpers.identity, w, 1)
    finally:
        if w in dx.workers():
            dx.rmprocs(w)


def test_large_replies_and_small_ones_alternate(cluster: list[int]) -> None:
    w = cluster[0]
    for size in (10, 300_000, 10, 4_000_000, 10, 262_000, 262_200, 10):
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        assert dx.remotecall_fetch(helpers.identity, w, data) == data
    assert dx.remotecall_fetch(helpers.identity, w, 7) == 7


def test_many_threads_call_one_worker_at_once(cluster: list[int]) -> None:
    w = cluster[1]
    errors: list[BaseException] = []

    def caller(k: int) -> None:
        try:
            for i in range(200):
                v = (k, i)
                if i % 50 == 0:
                    assert dx.remotecall(helpers.identity, w, v).fetch() == v
                else:
                    assert dx.remotecall_fetch(helpers.identity, w, v) == v
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert not errors
    assert not any(t.is_alive() for t in threads)


def test_keyboard_interrupt_while_the_caller_reads_leaves_the_link_whole(
    cluster: list[int],
) -> None:
    w = cluster[0]
    assert dx.remotecall_fetch(helpers.identity, w, 0) == 0
    helpers.wait_until(lambda: _reading(w) == _cluster._IDLE, what="a quiet link")
    main = threading.get_ident()

    def interrupt() -> None:
        helpers.wait_until(lambda: _reading(w) == _cluster._CALLER, what="the caller reading")
        time.sleep(0.05)
        signal.pthread_kill(main, signal.SIGINT)

    t = threading.Thread(target=interrupt)
    t.start()
    with pytest.raises(KeyboardInterrupt):
        dx.remotecall_fetch(time.sleep, w, 1.0)
    t.join(10)
    # The abandoned reply arrives later and is dropped; the link carries on.
    for i in range(20):
        assert dx.remotecall_fetch(helpers.identity, w, ("after", i)) == ("after", i)
    assert w in dx.workers()


def test_a_call_and_its_arguments_are_freed_once_it_returns(cluster: list[int]) -> None:
    """The reader that ran a call blocks for the next message on its link: it must not hold
    the call meanwhile. Asked over another link (worker to worker), which leaves that one
    blocked, the argument must already be gone."""
    w2, w3 = cluster

    class Payload:
        pass

    def keep(obj: object) -> bool:
        import weakref

        import distexec

        distexec._test_payload = weakref.ref(obj)  # type: ignore[attr-defined]
        return True

    def freed() -> bool:
        import gc

        import distexec

        gc.collect()
        return distexec._test_payload() is None  # type: ignore[attr-defined,no-any-return]

    assert dx.remotecall_fetch(keep, w2, Payload())
    assert dx.remotecall_fetch(lambda: dx.remotecall_fetch(freed, w2), w3)

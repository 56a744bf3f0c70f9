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
from concurrent.futures import CancelledError

import helpers
import pytest

import distexec as dx
from distexec import _cluster
from distexec import executor as executor_mod
from distexec._protocol.messages import ResultMsg
from distexec._transport import framing

pytestmark = pytest.mark.timeout(60)


_reading = helpers.link_reader


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
    t = helpers.interrupt_while_the_caller_reads(w)
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


# -- polling for an answer due any moment (FLAG_WAIT, DISTEXEC_SPIN_US) ----------------------


def _flags_of_answers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record ``(tag, flags)`` of every message this process reads from now on."""
    seen: list[tuple[int, int]] = []
    read = framing.FrameReader.read

    def recording(self: framing.FrameReader) -> framing.Frame:
        frame = read(self)
        seen.append((frame.tag, frame.flags))
        return frame

    monkeypatch.setattr(framing.FrameReader, "read", recording)
    return seen


def test_a_lone_call_and_its_answer_carry_flag_wait(
    cluster: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _cluster._SPIN:
        pytest.skip("DISTEXEC_SPIN_US=0 in this environment: nothing polls")
    w = cluster[0]
    # (A reader thread blocked in a read since before the patch would not be recorded.)
    helpers.wait_until(lambda: _reading(w) == _cluster._IDLE, what="a quiet link")
    seen = _flags_of_answers(monkeypatch)
    assert dx.remotecall_fetch(helpers.identity, w, 1) == 1
    assert (ResultMsg.TAG, framing.FLAG_WAIT) in seen  # the worker echoed the caller's flag
    seen.clear()
    assert dx.remotecall(helpers.identity, w, 2).fetch() == 2
    assert seen and not any(flags & framing.FLAG_WAIT for _tag, flags in seen)


@pytest.fixture
def long_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers poll up to 200 ms: long enough that a loaded machine still answers in time."""
    monkeypatch.setattr(_cluster, "_SPIN", 0.2)
    monkeypatch.setattr(executor_mod, "_SPIN", 0.2)


def test_an_executor_caller_reads_its_own_answer(long_polls: None) -> None:
    readers: list[int] = []
    completed = dx.DistributedExecutor._completed

    def recording(self: dx.DistributedExecutor, item: object, ok: bool, value: object) -> None:
        readers.append(threading.get_ident())
        completed(self, item, ok, value)  # type: ignore[arg-type]

    with dx.DistributedExecutor(max_workers=1) as ex:
        assert ex.submit(helpers.identity, 0).result() == 0
        (w,) = ex.workers()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dx.DistributedExecutor, "_completed", recording)
            for i in range(30):
                assert ex.submit(helpers.identity, i).result() == i
        assert threading.get_ident() in readers  # no hand-off from a reader thread
        helpers.wait_until(lambda: _reading(w) == _cluster._IDLE, what="a quiet link again")
        # An answer that takes longer than the poll is waited for the usual way.
        assert ex.submit(time.sleep, 0.5).result() is None
        assert ex.submit(helpers.identity, "after").result() == "after"


def test_a_caller_reading_for_its_answer_still_hears_a_cancel(long_polls: None) -> None:
    with dx.DistributedExecutor(max_workers=1) as ex:
        assert ex.submit(helpers.identity, 0).result() == 0
        fut = ex.submit(time.sleep, 30)
        helpers.wait_until(fut.running, what="the call to run")
        timer = threading.Timer(0.5, fut.cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(CancelledError):
            fut.result()
        assert time.monotonic() - started < 10  # the read gave up; the cancel reached it
        timer.join()
        assert ex.submit(helpers.identity, 1).result() == 1


def test_spin_us_zero_polls_nothing() -> None:
    out = helpers.run_python(
        "import sys\n"
        f"sys.path.insert(0, {os.path.dirname(helpers.__file__)!r})\n"
        "import distexec as dx, helpers\n"
        "from distexec import _cluster, _config\n"
        "from distexec._transport import framing\n"
        "assert _config.SPIN_SECONDS == 0.0\n"
        "def refuse(self, seconds): raise AssertionError('polled')\n"
        "framing.FrameReader.poll = refuse\n"
        "cid, parts = _cluster.group().prepare_call(abs, (-1,), {}, waiting=True)\n"
        "assert not bytes(parts[0])[1] & framing.FLAG_WAIT\n"
        "(w,) = dx.addprocs(1)\n"
        "got = [dx.remotecall_fetch(helpers.identity, w, i) for i in range(20)]\n"
        "assert got == list(range(20))\n"
        "with dx.DistributedExecutor(pool=dx.WorkerPool([w])) as ex:\n"
        "    assert [ex.submit(abs, -i).result() for i in range(20)] == list(range(20))\n"
        "dx.rmprocs(w)\n"
        "print('ok')\n",
        env={"DISTEXEC_SPIN_US": "0"},
    )
    assert out.stdout.strip() == "ok"


def test_a_bad_spin_us_is_refused_by_name() -> None:
    out = helpers.run_python("import distexec", env={"DISTEXEC_SPIN_US": "fast"}, check=False)
    assert out.returncode != 0
    assert "DISTEXEC_SPIN_US must be a number of microseconds, not 'fast'" in out.stderr

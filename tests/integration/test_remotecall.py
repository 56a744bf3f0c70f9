"""remotecall and friends on real local workers."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import math
import pickle
import threading
import time

import helpers
import pytest

import distexec as dx

pytestmark = pytest.mark.timeout(60)


def test_remotecall_fetch_runs_on_the_worker(cluster: list[int]) -> None:
    w = cluster[0]
    assert dx.remotecall_fetch(math.sqrt, w, 4) == 2.0
    assert dx.remotecall_fetch(dx.myid, w) == w
    assert dx.remotecall_fetch(helpers.ospid, w) != helpers.ospid()


def test_lambdas_and_closures_travel_by_value(cluster: list[int]) -> None:
    k = 7
    assert dx.remotecall_fetch(lambda x: x * k, cluster[1], 6) == 42


def test_user_keywords_reach_the_function_even_library_names(cluster: list[int]) -> None:
    def f(*, pid: int, fn: str, timeout: float) -> tuple[int, str, float]:
        return pid, fn, timeout

    assert dx.remotecall_fetch(f, cluster[0], pid=99, fn="x", timeout=1.5) == (99, "x", 1.5)
    assert dx.remotecall(f, cluster[0], pid=1, fn="y", timeout=2.0).fetch() == (1, "y", 2.0)


def test_remotecall_returns_a_future(cluster: list[int]) -> None:
    fut = dx.remotecall(pow, cluster[0], 2, 10)
    assert isinstance(fut, dx.Future)
    assert isinstance(fut, cf.Future)
    assert fut.where == cluster[0]
    assert fut.fetch() == 1024
    assert fut.isready() and dx.isready(fut)
    assert dx.fetch(fut) == 1024  # cached
    assert dx.remotecall_wait(pow, cluster[1], 3, 2).fetch() == 9


def test_futures_work_with_concurrent_futures_and_asyncio(cluster: list[int]) -> None:
    futs = [dx.remotecall(pow, cluster[i % 2], i, 2) for i in range(20)]
    _, not_done = cf.wait(futs, timeout=30)
    assert not not_done
    assert sorted(f.result() for f in cf.as_completed(futs)) == [i * i for i in range(20)]

    async def main() -> list[object]:
        a = await asyncio.wrap_future(dx.remotecall(pow, cluster[0], 5, 2))
        b = await dx.remotecall(pow, cluster[1], 6, 2)
        return [a, b]

    assert asyncio.run(main()) == [25, 36]


def test_remote_exception_carries_original_and_traceback(cluster: list[int]) -> None:
    with pytest.raises(dx.RemoteException) as info:
        dx.remotecall_fetch(helpers.raise_value_error, cluster[0], "boom")
    exc = info.value
    assert exc.pid == cluster[0]
    assert isinstance(exc.captured.ex, ValueError)
    assert str(exc.captured.ex) == "boom"
    assert "raise_value_error" in exc.captured.tb_text
    fut = dx.remotecall(helpers.raise_value_error, cluster[1], "later")
    with pytest.raises(dx.RemoteException):
        fut.fetch()
    with pytest.raises(dx.RemoteException):
        fut.wait()
    # The RemoteException itself survives pickling (it travels between workers too).
    again = pickle.loads(pickle.dumps(exc))
    assert again.pid == exc.pid and str(again.captured.ex) == "boom"


def test_exception_that_cannot_unpickle_arrives_as_text(cluster: list[int]) -> None:
    with pytest.raises(dx.RemoteException) as info:
        dx.remotecall_fetch(helpers.raise_bad_init, cluster[0])
    captured = info.value.captured
    assert captured.type_name == "helpers.BadInit"
    assert "1-2" in str(captured.ex)
    assert dx.remotecall_fetch(dx.myid, cluster[0]) == cluster[0]  # the link lives


def test_call_to_self_runs_inline_with_the_same_wrapping() -> None:
    box: list[int] = []
    assert dx.remotecall_fetch(box.append, dx.myid(), 1) is None
    assert box == [1]  # no copy: it ran here, on our list
    with pytest.raises(dx.RemoteException) as info:
        dx.remotecall_fetch(helpers.raise_value_error, 1, "local")
    assert info.value.pid == 1 and isinstance(info.value.captured.ex, ValueError)
    assert dx.remotecall(pow, 1, 2, 3).fetch() == 8
    with pytest.raises(dx.RemoteException):
        dx.remotecall(helpers.raise_value_error, 1, "x").fetch()


def _quiet() -> None:
    """Let reference-count traffic of earlier tests go out, so byte counts are ours alone."""
    import gc

    from distexec import refs

    gc.collect()
    refs.flush()


def test_unpicklable_argument_fails_at_once_and_sends_nothing(cluster: list[int]) -> None:
    _quiet()
    before = dx.statistics().bytes_sent
    lock = threading.Lock()
    with pytest.raises(dx.SerializationError) as info:
        dx.remotecall_fetch(helpers.identity, cluster[0], lock)
    assert isinstance(info.value, pickle.PicklingError)
    with pytest.raises(dx.SerializationError):
        dx.remotecall(helpers.identity, cluster[0], lock)
    assert dx.statistics().bytes_sent == before
    assert dx.remotecall_fetch(helpers.identity, cluster[0], 5) == 5


def test_argument_that_fails_to_unpickle_on_the_worker_fails_that_call_only(
    cluster: list[int],
) -> None:
    with pytest.raises(dx.RemoteException) as info:
        dx.remotecall_fetch(helpers.identity, cluster[0], helpers.UnpicklableOnLoad())
    assert isinstance(info.value.captured.ex, dx.DeserializationError)
    assert "refusing to be unpickled" in str(info.value)
    fut = dx.remotecall(helpers.identity, cluster[0], helpers.UnpicklableOnLoad())
    with pytest.raises(dx.RemoteException):
        fut.fetch()
    assert dx.remotecall_fetch(helpers.identity, cluster[0], 1) == 1


def test_result_that_raises_systemexit_when_unpickled_here(cluster: list[int]) -> None:
    with pytest.raises(dx.DeserializationError) as info:
        dx.remotecall_fetch(helpers.return_exit_on_load, cluster[0])
    assert info.value.type_name == "SystemExit"
    with pytest.raises(dx.DeserializationError):
        dx.remotecall(helpers.return_exit_on_load, cluster[1]).fetch()
    assert dx.remotecall_fetch(helpers.identity, cluster[0], 2) == 2


def test_result_that_cannot_pickle_fails_that_call_only(cluster: list[int]) -> None:
    with pytest.raises(dx.RemoteException) as info:
        dx.remotecall_fetch(threading.Lock, cluster[0])
    assert isinstance(info.value.captured.ex, dx.SerializationError)
    with pytest.raises(dx.RemoteException):
        dx.remotecall(threading.Lock, cluster[0]).fetch()
    assert dx.remotecall_fetch(helpers.identity, cluster[0], 3) == 3


def test_systemexit_and_keyboardinterrupt_in_user_code_fail_only_the_call(
    cluster: list[int],
) -> None:
    def leave() -> None:
        raise SystemExit(4)

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    for fn, tp in ((leave, SystemExit), (ctrl_c, KeyboardInterrupt)):
        with pytest.raises(dx.RemoteException) as info:
            dx.remotecall_fetch(fn, cluster[0])
        assert isinstance(info.value.captured.ex, tp)
    assert dx.remotecall_fetch(dx.myid, cluster[0]) == cluster[0]


def test_unknown_and_bad_pids_give_clear_errors(cluster: list[int]) -> None:
    with pytest.raises(ValueError, match="no process with id 999"):
        dx.remotecall_fetch(abs, 999, 1)
    with pytest.raises(ValueError, match="no process with id 999"):
        dx.remotecall(abs, 999, 1)
    with pytest.raises(TypeError):
        dx.remotecall_fetch(abs, "2", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        dx.remotecall_fetch(5, cluster[0])  # type: ignore[arg-type]


def test_a_blocked_call_does_not_starve_the_others(cluster: list[int]) -> None:
    """Two calls on one worker: the first waits for an event only the second sets."""

    def wait_for_flag() -> str:
        import builtins

        ev = builtins.__dict__.setdefault("_dx_test_event", threading.Event())
        return "released" if ev.wait(20) else "starved"

    def set_flag() -> str:
        import builtins

        builtins.__dict__.setdefault("_dx_test_event", threading.Event()).set()
        return "set"

    blocked = dx.remotecall(wait_for_flag, cluster[1])
    assert dx.remotecall_fetch(set_flag, cluster[1]) == "set"
    assert blocked.fetch(timeout=30) == "released"


def test_worker_to_worker_calls(cluster: list[int]) -> None:
    a, b = cluster

    def ask(other: int) -> tuple[int, int]:
        return dx.myid(), dx.remotecall_fetch(dx.myid, other)

    assert dx.remotecall_fetch(ask, a, b) == (a, b)
    assert dx.remotecall_fetch(ask, b, a) == (b, a)
    assert dx.remotecall_fetch(lambda: dx.remotecall_fetch(dx.myid, 1), a) == 1


def test_future_put_is_write_once() -> None:
    f = dx.Future()
    assert not f.isready()
    dx.put(f, 5)
    assert f.fetch() == 5 and f.isready()
    with pytest.raises(dx.ClusterError, match="only once"):
        f.put(6)
    with pytest.raises(TypeError):
        dx.take(f)
    assert dx.fetch(7) == 7  # Julia: fetch(x) = x


def test_large_values_stay_with_their_owner_until_fetched(cluster: list[int]) -> None:
    from distexec import _config

    size = _config.INLINE_RESULT_BYTES * 2

    def owned() -> int:
        return dx.statistics().owned_refs

    fut = dx.remotecall(bytes, cluster[0], size)
    fut.wait()
    assert dx.remotecall_fetch(owned, cluster[0]) == 1
    assert dx.statistics().client_refs == 1
    assert len(fut.fetch()) == size
    helpers.wait_until(lambda: dx.remotecall_fetch(owned, cluster[0]) == 0, what="owner to free")
    assert dx.statistics().client_refs == 0
    # An unfetched, dropped Future frees its value too.
    fut2 = dx.remotecall(bytes, cluster[0], size)
    fut2.wait()
    del fut2
    helpers.wait_until(lambda: dx.remotecall_fetch(owned, cluster[0]) == 0, what="owner to free")


def test_numpy_arrays_round_trip_out_of_band(cluster: list[int]) -> None:
    np = pytest.importorskip("numpy")
    a = np.arange(2_000_000, dtype=np.float64)
    b = dx.remotecall_fetch(helpers.identity, cluster[0], a)
    assert b.dtype == a.dtype and (a == b).all()
    b[0] = 5.0  # received arrays are writable, as with ProcessPoolExecutor
    assert dx.remotecall(helpers.identity, cluster[1], a).fetch().sum() == a.sum()


def test_statistics_is_a_frozen_record(cluster: list[int]) -> None:
    s = dx.statistics()
    assert s.myid == 1 and s.role == "master" and s.workers == 2
    with pytest.raises(AttributeError):
        s.workers = 3  # type: ignore[misc]
    ws = dx.remotecall_fetch(dx.statistics, cluster[0])
    assert ws.myid == cluster[0] and ws.role == "worker"


def _rebind_identity() -> str:
    import helpers as h

    h._saved_identity = h.identity  # type: ignore[attr-defined]
    h.identity = lambda x: ("rebound", x)
    return h.identity.__module__


def _restore_identity() -> None:
    import helpers as h

    h.identity = h._saved_identity  # type: ignore[attr-defined]


def test_a_function_sent_by_name_is_what_its_name_holds_on_the_worker(
    cluster: list[int],
) -> None:
    """Module functions travel by name and each side caches the lookup; a name rebound on
    the worker meanwhile must still be looked up afresh, as unpickling would."""
    w = cluster[1]
    assert dx.remotecall_fetch(helpers.identity, w, 1) == 1  # cached on both sides now
    dx.remotecall_fetch(_rebind_identity, w)
    try:
        assert dx.remotecall_fetch(helpers.identity, w, 1) == ("rebound", 1)
        assert dx.remotecall_fetch(helpers.identity, cluster[0], 1) == 1  # only there
    finally:
        dx.remotecall_fetch(_restore_identity, w)
    assert dx.remotecall_fetch(helpers.identity, w, 2) == 2


def _slow_dials(seconds: float) -> None:
    """On a worker: make its dials to other workers take *seconds* longer (so two cross)."""

    from distexec._transport import connection

    real = connection.dial

    def slow(*args: object, **kwargs: object) -> object:
        time.sleep(seconds)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    connection.dial = slow  # type: ignore[assignment]


def _dial(pid: int) -> None:
    from distexec import _cluster

    _cluster.group().dial_peer(pid)


def _dialling(pid: int) -> bool:
    from distexec import _cluster

    peer = _cluster.group().peer(pid)
    return peer is not None and peer.connecting


def _ask(other: int, n: int) -> list[int]:
    return [dx.remotecall(dx.myid, other).fetch(timeout=10) for _ in range(n)]


def _both_ways_work(lo: int, hi: int) -> None:
    """Calls cross the link in both directions, and neither side thinks the other gone."""
    for f in [dx.remotecall(_ask, lo, hi, 20), dx.remotecall(_ask, hi, lo, 20)] * 2:
        assert len(set(f.fetch(timeout=30))) == 1
    assert dx.remotecall_fetch(_ask, lo, hi, 1) == [hi]
    assert dx.remotecall_fetch(_ask, hi, lo, 1) == [lo]


@pytest.mark.parametrize("how", ["two-dials", "relay-and-own-call"])
def test_crossing_dials_leave_one_link_that_both_sides_use(
    no_leaked_workers: None, how: str
) -> None:
    """Two dials from the higher pid to the lower one can cross: its own first call, and the
    one pid 1 relays when the lower pid calls it first. Both sides must keep the same link;
    they used not to (the lower pid took the last one, which the higher one had closed), and
    calls between the two then hung or failed."""
    lo, hi = dx.addprocs(2)
    try:
        dx.remotecall_fetch(_slow_dials, hi, 0.5)
        if how == "two-dials":
            first, second = dx.remotecall(_dial, hi, lo), dx.remotecall(_dial, hi, lo)
        else:
            first = dx.remotecall(_ask, hi, lo, 1)  # hi dials lo for its own call ...
            helpers.wait_until(lambda: dx.remotecall_fetch(_dialling, hi, lo), what="a dial")
            second = dx.remotecall(_ask, lo, hi, 1)  # ... while lo has pid 1 ask hi to dial
        first.fetch(timeout=30)
        second.fetch(timeout=30)
        _both_ways_work(lo, hi)
    finally:
        dx.rmprocs([lo, hi])

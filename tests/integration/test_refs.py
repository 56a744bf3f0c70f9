"""Remote references: RemoteChannel, refs that travel, distributed reference counting."""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import cloudpickle
import helpers
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import distexec as dx
from distexec import refs

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def three() -> object:
    pids = dx.addprocs(3)
    yield pids
    dx.rmprocs(pids)


def settle(pids: list[int]) -> None:
    """Collect garbage and send pending reference-count changes everywhere."""

    def local_settle() -> None:
        import gc as _gc

        from distexec import refs as _refs

        _gc.collect()
        _refs.flush()

    for _ in range(2):
        local_settle()
        for p in pids:
            dx.remotecall_fetch(local_settle, p)


def tables(pids: list[int]) -> dict[int, tuple[int, int]]:
    out = {1: (dx.statistics().owned_refs, dx.statistics().client_refs)}
    for p in pids:
        s = dx.remotecall_fetch(dx.statistics, p)
        out[p] = (s.owned_refs, s.client_refs)
    return out


def all_zero(pids: list[int]) -> bool:
    settle(pids)
    return all(v == (0, 0) for v in tables(pids).values())


# ------------------------------------------------------------------------- RemoteChannel


def test_remote_channel_put_take_fetch(three: list[int]) -> None:
    ch = dx.RemoteChannel(three[0])
    assert ch.where == three[0]
    ch.put(1)
    assert ch.isready() and dx.isready(ch)
    assert ch.fetch() == 1 and dx.fetch(ch) == 1
    assert ch.take() == 1
    assert not ch.isready()
    dx.put(ch, 2)
    assert dx.take(ch) == 2


def test_remote_channel_blocks_without_blocking_its_owner(three: list[int]) -> None:
    owner = three[0]
    ch = dx.RemoteChannel(owner)  # Channel(1)
    ch.put("a")
    done = threading.Event()

    def second_put() -> None:
        ch.put("b")  # full: waits on the owner
        done.set()

    t = threading.Thread(target=second_put)
    t.start()
    assert not done.wait(0.3)
    # The owner still answers other calls while that put waits.
    assert dx.remotecall_fetch(dx.myid, owner) == owner
    assert ch.take() == "a"
    assert done.wait(10)
    assert ch.take() == "b"
    t.join()
    # take blocks while empty, and a put from another worker releases it.
    dx.remote_do(lambda c: (time.sleep(0.2), c.put("late")), three[1], ch)
    assert ch.take(timeout=10) == "late"


def test_remote_channel_with_a_factory(three: list[int]) -> None:
    ch = dx.RemoteChannel(lambda: dx.Channel(5), three[1])
    for i in range(5):
        ch.put(i)
    ch.close()
    assert list(ch) == [0, 1, 2, 3, 4]
    with pytest.raises(dx.ChannelClosedError):
        ch.take()
    with pytest.raises(dx.ChannelClosedError):
        ch.put(9)


def test_remote_channel_between_workers(three: list[int]) -> None:
    a, b, c = three
    ch = dx.RemoteChannel(lambda: dx.Channel(100), c)

    def produce(ch: dx.RemoteChannel, n: int) -> None:
        for i in range(n):
            ch.put(i)
        ch.close()

    def consume(ch: dx.RemoteChannel) -> int:
        return sum(ch)

    dx.remote_do(produce, a, ch, 200)
    assert dx.remotecall_fetch(consume, b, ch) == sum(range(200))


def test_local_remote_channel(three: list[int]) -> None:
    ch = dx.RemoteChannel()
    assert ch.where == 1
    dx.remote_do(lambda c: c.put(dx.myid()), three[0], ch)
    assert ch.take(timeout=10) == three[0]


def test_channel_from_id_and_remoteref_id(three: list[int]) -> None:
    ch = dx.RemoteChannel(three[0])
    rrid = dx.remoteref_id(ch)
    assert isinstance(rrid, dx.RRID) and rrid.whence == 1
    ch.put(5)
    assert dx.remotecall_fetch(lambda r: dx.channel_from_id(r).fetch(), three[0], rrid) == 5
    with pytest.raises(dx.RemoteException) as info:
        dx.remotecall_fetch(dx.channel_from_id, three[1], rrid)
    assert "Local instance of remote reference not found" in str(info.value)
    f = dx.remotecall(abs, three[0], -1)
    assert dx.remoteref_id(f) == f.rrid


def test_worker_id_from_socket(three: list[int]) -> None:
    from distexec import _cluster

    peer = _cluster.group().peer(three[0])
    assert dx.worker_id_from_socket(peer.conn) == three[0]
    assert dx.worker_id_from_socket(peer.conn.sock) == three[0]
    assert dx.worker_id_from_socket(None) == 1
    assert dx.worker_id_from_socket(object()) == -1


# ------------------------------------------------------------------------- refs that travel


def test_unfetched_future_is_fetched_from_its_owner(three: list[int]) -> None:
    a, b, _ = three
    f = dx.remotecall(lambda: (time.sleep(0.1), "made on a")[1], a)
    assert dx.remotecall_fetch(lambda fut: (fut.where, fut.fetch()), b, f) == (a, "made on a")
    assert f.fetch() == "made on a"


def _slow_await_from(delay: float) -> None:
    """Make this process's unpickling of a Future handle slow at the point where it starts
    awaiting the owner's answer (a thread descheduled there)."""
    from distexec import _cluster

    real = _cluster.ProcessGroup.await_from

    def slow(self: object, *args: object) -> None:
        time.sleep(delay)
        real(self, *args)  # type: ignore[arg-type]

    _cluster.ProcessGroup.await_from = slow  # type: ignore[method-assign]


def test_a_slow_receiver_still_hears_a_passed_futures_value(no_leaked_workers: None) -> None:
    """A Future passed to another worker: the receiver claims it at its owner, which answers
    with the value as soon as it is ready. A receiver slow to register its wait must not
    miss that answer (it did: the claim went out first, and the answer was dropped)."""
    a, b = dx.addprocs(2)
    try:
        dx.remotecall_fetch(_slow_await_from, b, 0.2)
        for _ in range(3):
            f = dx.remotecall(time.sleep, a, 0.05)  # not ready when it is sent
            assert dx.remotecall_fetch(lambda fut: fut.fetch(timeout=10), b, f) is None
    finally:
        dx.rmprocs(a, b)


def test_large_value_goes_from_owner_to_third_worker_not_through_pid1(three: list[int]) -> None:
    np = pytest.importorskip("numpy")
    a, b, _ = three
    f = dx.remotecall(np.ones, a, 20_000_000 // 8)  # 20 MB, stays on a
    f.wait()
    before = dx.statistics().bytes_received
    assert dx.remotecall_fetch(lambda fut: float(fut.fetch().sum()), b, f) == 20_000_000 / 8
    assert dx.statistics().bytes_received - before < 100_000  # the bytes went a -> b


def test_fetched_future_travels_with_its_value(three: list[int]) -> None:
    f = dx.remotecall(lambda: "v", three[0])
    f.fetch()  # the value is here now; the receiver never asks the owner
    assert dx.remotecall_fetch(lambda fut: (fut.done(), fut.fetch()), three[1], f) == (True, "v")


def test_future_returned_as_a_value(three: list[int]) -> None:
    a, _, c = three
    g = dx.remotecall_fetch(lambda: dx.remotecall(lambda: 7, c), a)
    assert isinstance(g, dx.Future) and g.where == c and g.fetch() == 7


def test_same_ref_twice_is_the_same_object(three: list[int]) -> None:
    ch = dx.RemoteChannel(three[0])
    assert dx.remotecall_fetch(lambda x, y: x is y, three[1], ch, ch)
    assert dx.remotecall_fetch(lambda x: x, three[1], ch) is ch


def test_failed_future_travels_failed(three: list[int]) -> None:
    f = dx.remotecall(helpers.raise_value_error, three[0], "x")
    with pytest.raises(dx.RemoteException):
        f.fetch()

    def check(fut: dx.Future) -> str:
        try:
            fut.fetch()
        except dx.RemoteException as exc:
            return type(exc.captured.ex).__name__
        return "no error"

    assert dx.remotecall_fetch(check, three[1], f) == "ValueError"


def test_future_put_once_from_any_process(three: list[int]) -> None:
    f = dx.Future(three[0])  # Julia's Future(pid): the value will live on that worker
    assert not f.isready()
    dx.remotecall_fetch(lambda fut: fut.put(41), three[1], f)
    assert f.fetch(timeout=10) == 41
    with pytest.raises(dx.ClusterError, match="only once"):
        f.put(42)
    with pytest.raises(dx.RemoteException) as info:
        dx.remotecall_fetch(lambda fut: fut.put(43), three[2], f)
    assert "only once" in str(info.value)


def test_ref_whose_owner_died(three: list[int]) -> None:
    (victim,) = dx.addprocs(1)
    ch = dx.RemoteChannel(victim)
    ch.put(1)
    f = dx.remotecall(time.sleep, victim, 30)
    os.kill(_ospid(victim), signal.SIGKILL)
    with pytest.raises(dx.ProcessExitedException):
        f.fetch(timeout=10)
    with pytest.raises(dx.ProcessExitedException):
        ch.take()


def _ospid(pid: int) -> int:
    return int(dx.remotecall_fetch(helpers.ospid, pid))


# ------------------------------------------------------------------------- no leaks


def test_tables_return_to_zero_after_mixed_traffic(three: list[int]) -> None:
    """Fetched, unfetched, dropped, forwarded Futures and RemoteChannels: nothing leaks."""
    settle(three)
    assert all_zero(three), tables(three)
    rng = random.Random(3)
    n = 0
    t0 = time.monotonic()
    total = 100_000
    while n < total:
        futs = [dx.remotecall(abs, rng.choice(three), -i) for i in range(500)]
        n += len(futs)
        for i, f in enumerate(futs):
            kind = i % 10
            if kind < 4:
                f.fetch()
            elif kind == 4:
                # forwarded to a third worker, fetched there
                dx.remote_do(lambda fut: fut.fetch(), rng.choice(three), f)
            elif kind == 5:
                f.wait()
        del futs, f
        if n % 10_000 == 0:
            ch = dx.RemoteChannel(rng.choice(three))
            ch.put(n)
            dx.remotecall_fetch(lambda x: x.take(), rng.choice(three), ch)
            del ch
    print(f"{total} remotecalls with forwarding: {time.monotonic() - t0:.1f} s")
    helpers.wait_until(lambda: all_zero(three), timeout=30, what="every table to return to zero")
    print(tables(three))


def test_large_unfetched_values_are_freed(three: list[int]) -> None:
    from distexec import _config

    size = _config.INLINE_RESULT_BYTES * 2
    futs = [dx.remotecall(bytes, p, size) for p in three for _ in range(3)]
    for f in futs:
        f.wait()
    settle(three)
    assert sum(tables(three)[p][0] for p in three) == 9
    assert tables(three)[1][1] == 9
    del futs, f
    helpers.wait_until(lambda: all_zero(three), timeout=30, what="freed")


class RefcountMachine(RuleBasedStateMachine):
    """Random add / fetch / forward / drop / worker death; every table must end at zero."""

    pids: ClassVar[list[int]] = []

    def __init__(self) -> None:
        super().__init__()
        self.held: list[object] = []

    @rule(where=st.integers(0, 2), big=st.booleans())
    def add(self, where: int, big: bool) -> None:
        from distexec import _config

        pid = self.pids[where]
        n = _config.INLINE_RESULT_BYTES * 2 if big else 10
        self.held.append(dx.remotecall(bytes, pid, n))

    @rule(where=st.integers(0, 2))
    def add_channel(self, where: int) -> None:
        self.held.append(dx.RemoteChannel(self.pids[where]))

    @rule(i=st.integers(0, 50))
    def fetch(self, i: int) -> None:
        if self.held:
            h = self.held[i % len(self.held)]
            if isinstance(h, dx.Future):
                h.fetch()

    @rule(i=st.integers(0, 50), to=st.integers(0, 2), keep=st.booleans())
    def forward(self, i: int, to: int, keep: bool) -> None:
        if not self.held:
            return
        h = self.held[i % len(self.held)]
        if keep:  # the third worker keeps it for a while (in a global), then lets go
            dx.remotecall_fetch(_stash, self.pids[to], h)
        else:
            dx.remotecall_fetch(lambda x: repr(x), self.pids[to], h)

    @rule(i=st.integers(0, 50))
    def drop(self, i: int) -> None:
        if self.held:
            self.held.pop(i % len(self.held))

    @invariant()
    def counts_are_sane(self) -> None:
        s = dx.statistics()
        assert s.owned_refs >= 0 and s.client_refs >= 0

    def teardown(self) -> None:
        self.held.clear()
        for p in self.pids:
            dx.remotecall_fetch(_unstash, p)
        helpers.wait_until(lambda: all_zero(self.pids), timeout=30, what="tables at zero")


_stash_list: list[object] = []


def _stash(x: object) -> None:
    _stash_list.append(x)


def _unstash() -> None:
    _stash_list.clear()


def test_refcount_state_machine(three: list[int]) -> None:
    RefcountMachine.pids = three
    run = RefcountMachine.TestCase
    run.settings = settings(
        max_examples=12,
        stateful_step_count=15,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        # No shrinking: each example ends in a wait of up to 30 s, and shrinking would run
        # many more of them past the test's timeout (which hypothesis would catch as a failure).
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        print_blob=True,
    )
    run().runTest()


def _first(x: object, *rest: object) -> str:
    return repr(x)


@pytest.mark.parametrize("by_value", [False, True], ids=["lambda-after-handle", "registered"])
def test_handles_pickled_twice_are_registered_once(
    three: list[int], by_value: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The codec pickles a message a second time (with cloudpickle) when the C pickler fails
    on something after a handle (a lambda) or the message names a by-value module (__main__,
    cloudpickle.register_pickle_by_value): the handles in it must still cost one count each."""
    settle(three)
    assert all_zero(three), tables(three)
    f = dx.remotecall(bytes, three[0], 10)
    ch = dx.RemoteChannel(three[1])
    if by_value:  # a module registered by value: every message is pickled twice
        (tmp_path / "dx_by_value_mod.py").write_text("def first(x, *rest):\n    return repr(x)\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        import dx_by_value_mod  # type: ignore[import-not-found]

        cloudpickle.register_pickle_by_value(dx_by_value_mod)
        try:
            for p in three:
                assert "Future" in dx.remotecall_fetch(dx_by_value_mod.first, p, f)
                assert "RemoteChannel" in dx.remotecall_fetch(dx_by_value_mod.first, p, ch)
        finally:
            cloudpickle.unregister_pickle_by_value(dx_by_value_mod)
            sys.modules.pop("dx_by_value_mod", None)
    else:
        for p in three:
            assert "Future" in dx.remotecall_fetch(_first, p, f, lambda: 0)
            assert "RemoteChannel" in dx.remotecall_fetch(_first, p, ch, lambda: 0)
    del f, ch
    helpers.wait_until(lambda: all_zero(three), timeout=30, what="every table to return to zero")


def test_handles_in_a_message_that_cannot_be_pickled_are_given_back(three: list[int]) -> None:
    """An argument after a handle fails to pickle: nothing is sent, and the owner forgets the
    transfer it was told to keep for that message."""
    settle(three)
    f = dx.remotecall(bytes, three[0], 10)
    ch = dx.RemoteChannel(three[1])
    for p in three:
        with pytest.raises(dx.SerializationError):
            dx.remotecall_fetch(_first, p, f, ch, threading.Lock())
    assert f.fetch() == bytes(10)
    del f, ch
    helpers.wait_until(lambda: all_zero(three), timeout=30, what="every table to return to zero")


def test_refcounts_survive_a_dead_client(three: list[int]) -> None:
    (extra,) = dx.addprocs(1)
    f = dx.remotecall(bytes, three[0], 10)
    f.fetch()
    ch = dx.RemoteChannel(three[0])
    dx.remotecall_fetch(_stash, extra, ch)  # extra holds a count on three[0]
    # Its claim must have left before it dies (a claim lost in flight with its sender is a
    # known limit: the owner keeps that one transfer until the sender of the handle dies).
    dx.remotecall_fetch(refs.flush, extra)
    del ch
    os.kill(_ospid(extra), signal.SIGKILL)
    helpers.wait_until(lambda: extra not in dx.workers(), what="extra gone")
    helpers.wait_until(lambda: all_zero(three), timeout=30, what="dead client's counts dropped")


# ------------------------------------------------------------------------- topologies


def test_changing_topology_or_lazy_is_refused(three: list[int]) -> None:
    with pytest.raises(dx.ClusterError, match="Requested Topology master_worker cannot be set"):
        dx.addprocs(1, topology="master_worker")
    with pytest.raises(dx.ClusterError, match="Cannot set lazy=False"):
        dx.addprocs(1, lazy=False)


def test_procs_of_a_host(three: list[int]) -> None:
    assert dx.procs(three[0]) == [1, *three]
    assert dx.remotecall_fetch(dx.procs, three[1], three[0]) == [1, *three]


def test_master_worker_and_eager_topologies() -> None:

    code = (
        "import distexec as dx\n"
        "a, b = dx.addprocs(2, topology='master_worker')\n"
        "try:\n"
        "    dx.remotecall_fetch(lambda: dx.remotecall_fetch(dx.myid, b), a)\n"
        "except dx.RemoteException as e:\n"
        "    print('refused:', e.captured.ex)\n"
        "print('workers see', dx.remotecall_fetch(dx.workers, a))\n"
        "dx.rmprocs(a, b)\n"
        "c, d = dx.addprocs(2, lazy=False)\n"
        "print('eager', dx.remotecall_fetch(lambda: dx.remotecall_fetch(dx.myid, c), d))\n"
    )
    out = helpers.run_python(code, timeout=120)
    assert "is not connected to 2. Topology : master_worker" in out.stdout
    assert "workers see [2, 3]" in out.stdout
    assert "eager 4" in out.stdout

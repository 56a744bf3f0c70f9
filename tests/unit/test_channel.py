"""Tests of distexec._channel.Channel with real threads.

Ordering is proven with events and conditions, never with sleeps. Where a test must
show that something has *not* happened yet, it waits at most ``NOT_YET`` seconds.
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import wait_until
from hypothesis import given
from strategies import channel_ops, channel_sizes

from distexec._channel import Channel
from distexec.errors import ChannelClosedError, ClusterError, DistexecError

NOT_YET = 0.1  # seconds to observe that a blocked call stays blocked
DONE = 10.0  # seconds to wait for something that must happen

BUFFERED = [1, 3, math.inf]
ALL_SIZES = [0, *BUFFERED]


# --- helpers ------------------------------------------------------------------------------


class Background:
    """Runs ``fn(*args, **kwargs)`` in a daemon thread and keeps its outcome."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.started = threading.Event()
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self.thread.start()
        assert self.started.wait(DONE)

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.started.set()
        try:
            self.result = fn(*args, **kwargs)
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def still_blocked(self) -> bool:
        return not self.done.wait(NOT_YET)

    def outcome(self) -> Any:
        """Wait for the call to finish; return its result or raise its exception."""
        assert self.done.wait(DONE), "the background call did not finish"
        self.thread.join(DONE)
        if self.error is not None:
            raise self.error
        return self.result


def put_when_a_taker_waits(chan: Channel, value: Any) -> None:
    """``put(timeout=0)`` until it succeeds: on an unbuffered channel it only can once a
    taker is blocked waiting, so this also proves that a ``take`` is waiting."""

    def attempt() -> bool:
        try:
            chan.put(value, timeout=0)
        except TimeoutError:
            return False
        return True

    wait_until(attempt, DONE, "a taker to accept a put(timeout=0)")


@pytest.fixture(autouse=True)
def no_leftover_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    for thread in set(threading.enumerate()) - before:
        thread.join(DONE)
    assert set(threading.enumerate()) - before == set()


# --- construction and introspection ---------------------------------------------------------


def test_default_size_is_unbuffered_as_in_julia() -> None:
    assert Channel().size == 0


@pytest.mark.parametrize(("size", "expected"), [(0, 0), (1, 1), (10, 10), (math.inf, math.inf)])
def test_size(size: int | float, expected: int | float) -> None:
    assert Channel(size).size == expected


def test_none_size_is_unbounded() -> None:
    chan = Channel(None)
    assert chan.size == math.inf
    for i in range(1000):
        chan.put(i, timeout=0)
    assert chan.n_avail() == 1000


invalid_sizes = [
    (-1, ValueError),
    (-math.inf, TypeError),
    (1.5, TypeError),
    (2.0, TypeError),
    ("3", TypeError),
    (True, TypeError),
]


@pytest.mark.parametrize(("size", "expected"), invalid_sizes)
def test_invalid_sizes(size: Any, expected: type[Exception]) -> None:
    with pytest.raises(expected, match="Channel size"):
        Channel(size)


def test_repr_shows_size_length_and_state() -> None:
    chan = Channel(1)
    assert repr(chan) == "<Channel size=1 len=0 open>"
    chan.put("x")
    assert repr(chan) == "<Channel size=1 len=1 open>"
    chan.close()
    assert repr(chan) == "<Channel size=1 len=1 closed>"
    assert repr(Channel(None)) == "<Channel size=inf len=0 open>"


def test_put_returns_the_value_and_take_removes_it() -> None:
    chan = Channel(2)
    value = object()
    assert chan.put(value) is value
    assert chan.isready() and not chan.isempty() and chan.n_avail() == 1
    assert chan.take() is value
    assert not chan.isready() and chan.isempty() and chan.n_avail() == 0


def test_fetch_and_wait_do_not_remove() -> None:
    chan = Channel(3)
    chan.put("a")
    chan.put("b")
    assert chan.fetch() == "a"
    assert chan.fetch() == "a"
    chan.wait()
    assert chan.n_avail() == 2
    assert [chan.take(), chan.take()] == ["a", "b"]


def test_none_is_a_value_like_any_other() -> None:
    chan = Channel(1)
    chan.put(None)
    assert chan.isready()
    assert chan.fetch() is None
    assert chan.take() is None


# --- FIFO and blocking (buffered) -------------------------------------------------------------


@pytest.mark.parametrize("size", ALL_SIZES)
def test_fifo_order_through_a_producer_thread(size: int | float) -> None:
    chan = Channel(size)
    producer = Background(lambda: [chan.put(i) for i in range(200)])
    assert [chan.take() for _ in range(200)] == list(range(200))
    producer.outcome()


@pytest.mark.parametrize("size", [1, 3])
def test_put_blocks_while_full(size: int) -> None:
    chan = Channel(size)
    for i in range(size):
        chan.put(i)
    putter = Background(chan.put, "last")
    assert putter.still_blocked()
    assert chan.take() == 0
    assert putter.outcome() == "last"
    assert [chan.take() for _ in range(size)] == [*range(1, size), "last"]


@pytest.mark.parametrize("size", ALL_SIZES)
def test_take_blocks_while_empty(size: int | float) -> None:
    chan = Channel(size)
    taker = Background(chan.take)
    assert taker.still_blocked()
    chan.put("x")
    assert taker.outcome() == "x"


@pytest.mark.parametrize("size", BUFFERED)
def test_fetch_blocks_while_empty_and_leaves_the_item(size: int | float) -> None:
    chan = Channel(size)
    fetcher = Background(chan.fetch)
    assert fetcher.still_blocked()
    chan.put("x")
    assert fetcher.outcome() == "x"
    assert chan.take(timeout=0) == "x"


@pytest.mark.parametrize("size", BUFFERED)
def test_wait_blocks_until_an_item_arrives(size: int | float) -> None:
    chan = Channel(size)
    waiters = [Background(chan.wait) for _ in range(3)]
    assert waiters[0].still_blocked()
    chan.put("x")
    for waiter in waiters:
        assert waiter.outcome() is None
    assert chan.n_avail() == 1


def test_one_put_wakes_a_taker_even_while_fetchers_wait() -> None:
    chan = Channel(1)
    fetchers = [Background(chan.fetch) for _ in range(3)]
    taker = Background(chan.take)
    assert taker.still_blocked()
    chan.put("x")
    assert taker.outcome() == "x"
    # The fetchers saw "x" before the take or will see the next item.
    chan.put("y")
    assert {f.outcome() for f in fetchers} <= {"x", "y"}


# --- unbuffered rendezvous ----------------------------------------------------------------------


def test_unbuffered_put_does_not_return_before_a_take() -> None:
    chan = Channel(0)
    putter = Background(chan.put, "x")
    assert putter.still_blocked()
    assert chan.isready()  # a put is waiting
    assert chan.n_avail() == 1
    assert chan.take() == "x"
    assert putter.outcome() == "x"
    assert not chan.isready()


def test_unbuffered_wait_returns_when_a_put_is_waiting() -> None:
    chan = Channel(0)
    waiter = Background(chan.wait)
    assert waiter.still_blocked()
    putter = Background(chan.put, "x")
    assert waiter.outcome() is None
    assert putter.still_blocked()  # wait() did not take the value
    assert chan.take() == "x"
    putter.outcome()


def test_unbuffered_fetch_is_not_supported() -> None:
    with pytest.raises(ClusterError, match="unbuffered"):
        Channel(0).fetch()


def test_unbuffered_puts_are_matched_in_arrival_order() -> None:
    chan = Channel(0)
    putters = []
    for i in range(5):
        putters.append(Background(chan.put, i))
        wait_until(lambda: chan.n_avail() == len(putters), DONE, "the put to be waiting")
    assert [chan.take(timeout=0) for _ in range(5)] == [0, 1, 2, 3, 4]
    for i, putter in enumerate(putters):
        assert putter.outcome() == i


def test_unbuffered_put_hands_over_to_waiting_takers_at_once() -> None:
    chan = Channel(0)
    takers = [Background(chan.take) for _ in range(3)]
    for value in ("a", "b", "c"):
        put_when_a_taker_waits(chan, value)
    assert sorted(t.outcome() for t in takers) == ["a", "b", "c"]
    with pytest.raises(TimeoutError):  # every taker was served exactly once
        chan.put("d", timeout=0)


def test_unbuffered_many_putters_and_takers_never_outrun_each_other() -> None:
    chan = Channel(0)
    counts_lock = threading.Lock()
    counts = {"takes_started": 0, "puts_returned": 0}
    violations: list[tuple[int, int]] = []
    received: list[int] = []
    per_thread = 200

    def putter(base: int) -> None:
        for i in range(per_thread):
            chan.put(base + i)
            with counts_lock:
                counts["puts_returned"] += 1
                if counts["puts_returned"] > counts["takes_started"]:
                    violations.append((counts["puts_returned"], counts["takes_started"]))

    def taker() -> None:
        for _ in range(per_thread):
            with counts_lock:
                counts["takes_started"] += 1
            value = chan.take()
            with counts_lock:
                received.append(value)

    threads = [Background(putter, k * per_thread) for k in range(6)]
    threads += [Background(taker) for _ in range(6)]
    for thread in threads:
        thread.outcome()
    assert violations == []
    assert sorted(received) == list(range(6 * per_thread))


# --- close ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ALL_SIZES)
def test_close_is_idempotent(size: int | float) -> None:
    chan = Channel(size)
    assert chan.is_open and chan.isopen()
    chan.close()
    chan.close()
    assert not chan.is_open and not chan.isopen()


@pytest.mark.parametrize("size", ALL_SIZES)
def test_put_on_a_closed_channel_raises(size: int | float) -> None:
    chan = Channel(size)
    chan.close()
    with pytest.raises(ChannelClosedError, match="put on a closed channel"):
        chan.put(1)
    assert isinstance(ChannelClosedError("x"), DistexecError)


@pytest.mark.parametrize("size", BUFFERED)
def test_items_buffered_before_close_can_still_be_taken(size: int | float) -> None:
    chan = Channel(size)
    chan.put("a")
    chan.close()
    assert chan.isready()
    assert chan.fetch() == "a"
    chan.wait()
    assert chan.take() == "a"
    for op in (chan.take, chan.fetch, chan.wait):
        with pytest.raises(ChannelClosedError, match="closed and empty"):
            op()


def test_take_on_a_closed_unbuffered_channel_raises() -> None:
    chan = Channel(0)
    chan.close()
    for op in (chan.take, chan.wait):
        with pytest.raises(ChannelClosedError):
            op()


@pytest.mark.parametrize("size", ALL_SIZES)
def test_close_wakes_blocked_takers(size: int | float) -> None:
    chan = Channel(size)
    takers = [Background(chan.take) for _ in range(3)]
    assert takers[0].still_blocked()
    chan.close()
    for taker in takers:
        with pytest.raises(ChannelClosedError):
            taker.outcome()


@pytest.mark.parametrize("size", BUFFERED)
def test_close_wakes_blocked_fetchers_and_waiters(size: int | float) -> None:
    chan = Channel(size)
    blocked = [Background(chan.fetch), Background(chan.wait)]
    assert blocked[0].still_blocked()
    chan.close()
    for call in blocked:
        with pytest.raises(ChannelClosedError):
            call.outcome()


@pytest.mark.parametrize("size", [0, 1, 2])
def test_close_wakes_blocked_putters(size: int) -> None:
    chan = Channel(size)
    for i in range(size):
        chan.put(i)
    putters = [Background(chan.put, "late") for _ in range(3)]
    assert putters[0].still_blocked()
    chan.close()
    for putter in putters:
        with pytest.raises(ChannelClosedError, match="put on a closed channel"):
            putter.outcome()
    # What was buffered stays; the blocked puts added nothing.
    assert [chan.take() for _ in range(size)] == list(range(size))
    with pytest.raises(ChannelClosedError):
        chan.take(timeout=0)


def test_close_withdraws_pending_unbuffered_puts() -> None:
    chan = Channel(0)
    putter = Background(chan.put, "x")
    wait_until(chan.isready)
    chan.close()
    with pytest.raises(ChannelClosedError):
        putter.outcome()
    assert not chan.isready()
    with pytest.raises(ChannelClosedError):
        chan.take()


@pytest.mark.parametrize("size", ALL_SIZES)
def test_close_with_an_exception_chains_it(size: int | float) -> None:
    chan = Channel(size)
    reason = RuntimeError("the producer failed")
    taker = Background(chan.take)
    assert taker.still_blocked()
    chan.close(reason)
    chan.close(KeyError("ignored: the first close wins"))
    with pytest.raises(ChannelClosedError, match="the producer failed") as info:
        taker.outcome()
    assert info.value.__cause__ is reason
    with pytest.raises(ChannelClosedError) as info:
        chan.put(1)
    assert info.value.__cause__ is reason


def test_a_plain_close_error_has_no_cause() -> None:
    chan = Channel(1)
    chan.close()
    with pytest.raises(ChannelClosedError) as info:
        chan.take()
    assert info.value.__cause__ is None


def test_context_manager_closes() -> None:
    with Channel(1) as chan:
        chan.put(1)
    assert not chan.isopen()
    assert chan.take() == 1


# --- iteration ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ALL_SIZES)
def test_iteration_drains_and_ends_after_close(size: int | float) -> None:
    chan = Channel(size)

    def produce() -> None:
        for i in range(50):
            chan.put(i)
        chan.close()

    producer = Background(produce)
    assert list(chan) == list(range(50))
    producer.outcome()
    assert list(chan) == []


def test_iteration_after_close_with_an_exception_raises_once_drained() -> None:
    chan = Channel(math.inf)
    chan.put(1)
    chan.put(2)
    reason = ValueError("bad input")
    chan.close(reason)
    seen = []
    with pytest.raises(ChannelClosedError) as info:
        for item in chan:
            seen.append(item)
    assert seen == [1, 2]
    assert info.value.__cause__ is reason


# --- timeouts -------------------------------------------------------------------------------------


def _full(size: int | float) -> Channel:
    chan = Channel(size)
    for i in range(int(size)):
        chan.put(i)
    return chan


timeout_cases: list[tuple[str, int | float, Callable[[Channel, float], Any]]] = [
    ("take empty", 1, lambda c, t: c.take(timeout=t)),
    ("take empty", math.inf, lambda c, t: c.take(timeout=t)),
    ("take no putter", 0, lambda c, t: c.take(timeout=t)),
    ("fetch empty", 1, lambda c, t: c.fetch(timeout=t)),
    ("wait empty", 2, lambda c, t: c.wait(timeout=t)),
    ("wait no putter", 0, lambda c, t: c.wait(timeout=t)),
    ("put full", 1, lambda c, t: c.put("x", timeout=t)),
    ("put full", 3, lambda c, t: c.put("x", timeout=t)),
    ("put no taker", 0, lambda c, t: c.put("x", timeout=t)),
]


@pytest.mark.parametrize(("case", "size", "call"), timeout_cases)
@pytest.mark.parametrize("timeout", [0, -1, 0.05])
def test_timeouts_raise_and_leave_no_trace(
    case: str, size: int | float, call: Callable[[Channel, float], Any], timeout: float
) -> None:
    chan = _full(size) if case.startswith("put") else Channel(size)
    before = chan.n_avail()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out"):
        call(chan, timeout)
    assert time.monotonic() - start >= max(timeout, 0)
    assert chan.n_avail() == before
    assert chan.isopen()


def test_a_timed_out_unbuffered_put_is_withdrawn() -> None:
    chan = Channel(0)
    with pytest.raises(TimeoutError):
        chan.put("ghost", timeout=0.02)
    taker = Background(chan.take)
    put_when_a_taker_waits(chan, "real")
    assert taker.outcome() == "real"


def test_a_timed_out_unbuffered_take_is_withdrawn() -> None:
    chan = Channel(0)
    with pytest.raises(TimeoutError):
        chan.take(timeout=0.02)
    with pytest.raises(TimeoutError):  # nobody is waiting to take any more
        chan.put("x", timeout=0)


def test_a_timeout_that_is_long_enough_succeeds() -> None:
    chan = Channel(1)
    taker = Background(chan.take, timeout=DONE)
    assert taker.still_blocked()
    chan.put("x", timeout=math.inf)
    assert taker.outcome() == "x"


def test_closed_wins_over_timeout() -> None:
    chan = _full(1)
    chan.close()
    with pytest.raises(ChannelClosedError):
        chan.put("x", timeout=0)
    chan.take(timeout=0)
    with pytest.raises(ChannelClosedError):
        chan.take(timeout=0)


# --- many producers and consumers ---------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 7, math.inf])
def test_stress_every_item_is_received_exactly_once(size: int | float) -> None:
    producers, per_producer, consumers = 4, 2000, 3
    chan = Channel(size)

    def produce(k: int) -> None:
        for i in range(per_producer):
            chan.put((k, i))

    def consume() -> list[tuple[int, int]]:
        return list(chan)

    consuming = [Background(consume) for _ in range(consumers)]
    producing = [Background(produce, k) for k in range(producers)]
    for producer in producing:
        producer.outcome()
    chan.close()
    batches = [c.outcome() for c in consuming]

    received = collections.Counter(itertools.chain.from_iterable(batches))
    assert received == collections.Counter(
        (k, i) for k in range(producers) for i in range(per_producer)
    )
    # Each consumer sees each producer's items in the order they were put.
    for batch in batches:
        for k in range(producers):
            from_k = [i for (p, i) in batch if p == k]
            assert from_k == sorted(from_k)


# --- model-based -----------------------------------------------------------------------------


@given(size=channel_sizes(), ops=channel_ops())
def test_property_matches_a_sequential_model(size: int | float, ops: list[tuple[Any, ...]]) -> None:
    """Random non-blocking (timeout=0) operations behave as on a list and a flag."""
    chan = Channel(size)
    items: list[int] = []
    closed = False
    for op in ops:
        kind = op[0]
        if kind == "put":
            if closed:
                with pytest.raises(ChannelClosedError):
                    chan.put(op[1], timeout=0)
            elif len(items) >= size:  # always so when unbuffered: nobody is taking
                with pytest.raises(TimeoutError):
                    chan.put(op[1], timeout=0)
            else:
                assert chan.put(op[1], timeout=0) == op[1]
                items.append(op[1])
        elif kind in ("take", "fetch", "wait"):
            call = getattr(chan, kind)
            if kind == "fetch" and size == 0:
                with pytest.raises(ClusterError):
                    call(timeout=0)
            elif items:
                expected = (
                    items.pop(0) if kind == "take" else (items[0] if kind == "fetch" else None)
                )
                assert call(timeout=0) == expected
            elif closed:
                with pytest.raises(ChannelClosedError):
                    call(timeout=0)
            else:
                with pytest.raises(TimeoutError):
                    call(timeout=0)
        elif kind == "isready":
            assert chan.isready() == bool(items)
        else:
            chan.close()
            closed = True
        assert chan.isopen() == (not closed)
        assert chan.n_avail() == len(items)
        assert (
            repr(chan) == f"<Channel size={size} len={len(items)} {'closed' if closed else 'open'}>"
        )

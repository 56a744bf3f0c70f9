"""Tests of distexec.retry: ExponentialBackOff, retry, validate_delays.

No test sleeps: every retry gets a recording ``sleep``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import backoff_kwargs, delay_lists, seeds

from distexec.retry import ExponentialBackOff, retry, validate_delays

# --- helpers --------------------------------------------------------------------------


class SleepRecorder:
    """A ``sleep`` that records its argument instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class Flaky:
    """Raises ``exc_type`` on its first ``failures`` calls, then returns its arguments."""

    def __init__(self, failures: int, exc_type: type[BaseException] = RuntimeError) -> None:
        self.failures = failures
        self.exc_type = exc_type
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self.calls.append((args, kwargs))
        if len(self.calls) <= self.failures:
            raise self.exc_type(f"failure {len(self.calls)}")
        return args, kwargs


# --- ExponentialBackOff -----------------------------------------------------------------


def test_defaults_are_julias() -> None:
    backoff = ExponentialBackOff()
    assert (backoff.n, backoff.first_delay, backoff.max_delay) == (1, 0.05, 10.0)
    assert (backoff.factor, backoff.jitter) == (5.0, 0.1)
    assert list(backoff) == [0.05]
    assert len(backoff) == 1


def test_without_jitter_the_sequence_is_exact() -> None:
    backoff = ExponentialBackOff(n=6, first_delay=1, max_delay=10, factor=2, jitter=0)
    assert list(backoff) == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert all(type(d) is float for d in backoff)


def test_first_delay_is_capped_by_max_delay() -> None:
    assert list(ExponentialBackOff(n=2, first_delay=5, max_delay=3, jitter=0)) == [3.0, 3.0]


def test_n_zero_yields_nothing() -> None:
    backoff = ExponentialBackOff(n=0)
    assert list(backoff) == []
    assert len(backoff) == 0
    assert not backoff


invalid_backoffs = [
    ({"n": -1}, ValueError, "all inputs must be non-negative"),
    ({"first_delay": -0.1}, ValueError, "all inputs must be non-negative"),
    ({"max_delay": -1}, ValueError, "all inputs must be non-negative"),
    ({"factor": -2}, ValueError, "all inputs must be non-negative"),
    ({"jitter": -0.5}, ValueError, "all inputs must be non-negative"),
    ({"first_delay": math.nan}, ValueError, "all inputs must be non-negative"),
    ({"max_delay": math.nan}, ValueError, "all inputs must be non-negative"),
    ({"jitter": 1.5}, ValueError, "jitter must be at most 1"),
    ({"first_delay": math.inf}, ValueError, "must be finite"),
    ({"factor": math.inf}, ValueError, "must be finite"),
    ({"n": 2.0}, TypeError, "n must be an int"),
    ({"n": True}, TypeError, "n must be an int"),
    ({"factor": "5"}, TypeError, "factor must be a real number"),
]


@pytest.mark.parametrize(("kwargs", "expected", "message"), invalid_backoffs)
def test_invalid_arguments_are_rejected(
    kwargs: dict[str, Any], expected: type[Exception], message: str
) -> None:
    with pytest.raises(expected, match=message):
        ExponentialBackOff(**kwargs)


def test_max_delay_may_be_infinite() -> None:
    backoff = ExponentialBackOff(n=3, first_delay=1, max_delay=math.inf, factor=10, jitter=0)
    assert list(backoff) == [1.0, 10.0, 100.0]


def test_is_frozen_and_slotted() -> None:
    backoff = ExponentialBackOff()
    with pytest.raises(dataclasses.FrozenInstanceError):
        backoff.n = 3  # type: ignore[misc]
    assert not hasattr(backoff, "__dict__")


def test_repr_and_equality_ignore_the_rng() -> None:
    backoff = ExponentialBackOff(n=3, rng=random.Random(0))
    assert repr(backoff) == (
        "ExponentialBackOff(n=3, first_delay=0.05, max_delay=10.0, factor=5.0, jitter=0.1)"
    )
    assert backoff == ExponentialBackOff(n=3)
    assert hash(backoff) == hash(ExponentialBackOff(n=3))


def test_positional_arguments_follow_julias_order() -> None:
    backoff = ExponentialBackOff(3, 0.5, 4.0, 2.0, 0.0)
    assert list(backoff) == [0.5, 1.0, 2.0]


def test_reiterating_restarts_from_the_first_delay() -> None:
    backoff = ExponentialBackOff(n=4, first_delay=0.2, rng=random.Random(7))
    first, second = list(backoff), list(backoff)
    assert len(first) == len(second) == 4
    assert first[0] == second[0] == 0.2
    # The injected generator is shared, not re-seeded: the jitter differs between runs.
    assert first != second


def test_interleaved_iterators_are_independent() -> None:
    backoff = ExponentialBackOff(n=3, first_delay=1, factor=2, jitter=0)
    a, b = iter(backoff), iter(backoff)
    assert [next(a), next(b), next(a), next(b), next(a), next(b)] == [1, 1, 2, 2, 4, 4]


def test_default_rng_is_the_global_random_module() -> None:
    backoff = ExponentialBackOff(n=5)
    state = random.getstate()
    try:
        random.seed(1234)
        first = list(backoff)
        random.seed(1234)
        assert list(backoff) == first
    finally:
        random.setstate(state)


@given(kwargs=backoff_kwargs(), seed=seeds())
def test_property_reiterable_with_a_reseeded_rng(kwargs: dict[str, Any], seed: int) -> None:
    rng = random.Random(seed)
    backoff = ExponentialBackOff(**kwargs, rng=rng)
    first = list(backoff)
    rng.seed(seed)
    assert list(backoff) == first
    assert list(ExponentialBackOff(**kwargs, rng=random.Random(seed))) == first


@given(kwargs=backoff_kwargs(), seed=seeds())
def test_property_yields_exactly_n_delays_within_bounds(kwargs: dict[str, Any], seed: int) -> None:
    delays = list(ExponentialBackOff(**kwargs, rng=random.Random(seed)))
    assert len(delays) == kwargs["n"]
    assert all(0.0 <= d <= kwargs["max_delay"] for d in delays)
    if delays:
        assert delays[0] == min(kwargs["first_delay"], kwargs["max_delay"])


@given(kwargs=backoff_kwargs(), seed=seeds())
def test_property_each_step_is_within_the_jitter_envelope(
    kwargs: dict[str, Any], seed: int
) -> None:
    delays = list(ExponentialBackOff(**kwargs, rng=random.Random(seed)))
    cap, factor, jitter = kwargs["max_delay"], kwargs["factor"], kwargs["jitter"]
    for previous, current in itertools.pairwise(delays):
        low = min(cap, previous * factor * (1 - jitter))
        high = min(cap, previous * factor * (1 + jitter))
        assert low * (1 - 1e-12) <= current <= high * (1 + 1e-12)


@given(kwargs=backoff_kwargs(), seed=seeds())
def test_property_without_jitter_growth_is_monotone_up_to_the_cap(
    kwargs: dict[str, Any], seed: int
) -> None:
    kwargs = {**kwargs, "jitter": 0.0, "factor": max(1.0, kwargs["factor"])}
    delays = list(ExponentialBackOff(**kwargs, rng=random.Random(seed)))
    assert delays == sorted(delays)
    # Once capped, it stays capped.
    cap = kwargs["max_delay"]
    if cap in delays:
        assert all(d == cap for d in delays[delays.index(cap) :])


# --- retry: attempt counts ----------------------------------------------------------------


@given(failures=st.integers(min_value=0, max_value=8), delays=delay_lists())
def test_property_attempt_counts(failures: int, delays: list[float]) -> None:
    """A function failing k times, with n delays, is called min(k, n) + 1 times.

    k <= n: k failures, each followed by a sleep, then one success.
    k > n: n guarded failures with n sleeps, then the unguarded last call raises.
    """
    fn, sleep = Flaky(failures), SleepRecorder()
    call = retry(fn, delays, sleep=sleep)
    n = len(delays)
    if failures <= n:
        assert call(1, key="v") == ((1,), {"key": "v"})
    else:
        with pytest.raises(RuntimeError, match=f"failure {n + 1}"):
            call(1, key="v")
    assert len(fn.calls) == min(failures, n) + 1
    assert sleep.delays == delays[: min(failures, n)]
    assert all(c == ((1,), {"key": "v"}) for c in fn.calls)


attempt_cases = [
    # (failures, delays, expected calls, expected sleeps, raises)
    (0, [], 1, [], False),
    (1, [], 1, [], True),
    (1, [0.5], 2, [0.5], False),
    (2, [0.5], 2, [0.5], True),
    (3, [0.0, 0.0, 0.0], 4, [0.0, 0.0, 0.0], False),
    (4, [0.0, 0.0, 0.0], 4, [0.0, 0.0, 0.0], True),
    (2, [1.0, 2.0, 3.0], 3, [1.0, 2.0], False),
]


@pytest.mark.parametrize(("failures", "delays", "calls", "sleeps", "raises"), attempt_cases)
def test_attempt_count_table(
    failures: int, delays: list[float], calls: int, sleeps: list[float], raises: bool
) -> None:
    fn, sleep = Flaky(failures), SleepRecorder()
    call = retry(fn, delays, sleep=sleep)
    if raises:
        with pytest.raises(RuntimeError):
            call()
    else:
        call()
    assert len(fn.calls) == calls
    assert sleep.delays == sleeps


def test_default_delays_allow_two_attempts() -> None:
    fn, sleep = Flaky(5), SleepRecorder()
    with pytest.raises(RuntimeError, match="failure 2"):
        retry(fn, sleep=sleep)()
    assert len(fn.calls) == 2
    assert sleep.delays == [0.05]


def test_exponential_backoff_delays_are_slept_in_order() -> None:
    backoff = ExponentialBackOff(n=4, first_delay=0.1, factor=3, jitter=0.5, rng=random.Random(3))
    fn, sleep = Flaky(10), SleepRecorder()
    with pytest.raises(RuntimeError):
        retry(fn, backoff, sleep=sleep)()
    backoff.rng.seed(3)  # type: ignore[union-attr]
    assert sleep.delays == list(backoff)
    assert len(fn.calls) == 5


def test_each_call_of_the_wrapper_gets_the_full_schedule() -> None:
    fn, sleep = Flaky(100), SleepRecorder()
    call = retry(fn, (0.1, 0.2), sleep=sleep)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            call()
    assert len(fn.calls) == 9
    assert sleep.delays == [0.1, 0.2] * 3


def test_base_exceptions_are_not_retried() -> None:
    fn, sleep = Flaky(1, KeyboardInterrupt), SleepRecorder()
    with pytest.raises(KeyboardInterrupt):
        retry(fn, [0.0, 0.0], sleep=sleep)()
    assert len(fn.calls) == 1
    assert sleep.delays == []


def test_the_reraised_exception_is_the_original_one() -> None:
    error = ValueError("the original")

    def fail() -> None:
        raise error

    with pytest.raises(ValueError) as info:
        retry(fail, [0.0], sleep=SleepRecorder())()
    assert info.value is error


def test_wraps_the_function() -> None:
    def compute(x: int) -> int:
        """Doc of compute."""
        return x + 1

    call = retry(compute, sleep=SleepRecorder())
    assert call.__name__ == "compute"
    assert call.__doc__ == "Doc of compute."
    assert call.__wrapped__ is compute  # type: ignore[attr-defined]
    assert call(1) == 2


# --- retry: check -------------------------------------------------------------------------


@pytest.mark.parametrize("stop_at", [1, 2, 3])
def test_check_returning_false_reraises_at_once(stop_at: int) -> None:
    fn, sleep = Flaky(100), SleepRecorder()
    seen: list[str] = []

    def check(state: Any, exc: Exception) -> bool:
        seen.append(str(exc))
        return len(seen) < stop_at

    with pytest.raises(RuntimeError, match=f"failure {stop_at}"):
        retry(fn, [0.0] * 5, check, sleep=sleep)()
    assert len(fn.calls) == stop_at
    assert len(sleep.delays) == stop_at - 1
    assert seen == [f"failure {i}" for i in range(1, stop_at + 1)]


def test_check_is_not_called_for_the_final_unguarded_attempt() -> None:
    fn, checks = Flaky(100), []

    def check(state: Any, exc: Exception) -> bool:
        checks.append(exc)
        return True

    call = retry(fn, [0.0, 0.0], check, sleep=SleepRecorder())
    with pytest.raises(RuntimeError, match="failure 3"):
        call()
    assert len(checks) == 2


def test_check_state_threads_through_and_restarts_per_call() -> None:
    fn = Flaky(100)
    states: list[Any] = []

    def check(state: Any, exc: Exception) -> tuple[Any, bool]:
        states.append(state)
        count = 0 if state is None else state
        return count + 1, True

    call = retry(fn, [0.0] * 3, check, sleep=SleepRecorder())
    with pytest.raises(RuntimeError):
        call()
    assert states == [None, 1, 2]
    with pytest.raises(RuntimeError):
        call()
    assert states == [None, 1, 2, None, 1, 2]


def test_check_tuple_can_stop() -> None:
    fn = Flaky(100)

    def check(state: Any, exc: Exception) -> tuple[Any, bool]:
        tries = (state or 0) + 1
        return tries, tries < 2

    with pytest.raises(RuntimeError, match="failure 2"):
        retry(fn, [0.0] * 10, check, sleep=SleepRecorder())()
    assert len(fn.calls) == 2


def test_check_sees_the_exception_and_can_filter_by_type() -> None:
    def is_transient(state: Any, exc: Exception) -> bool:
        return isinstance(exc, ConnectionError)

    transient, permanent = Flaky(2, ConnectionError), Flaky(2, KeyError)
    assert retry(transient, [0.0] * 3, is_transient, sleep=SleepRecorder())() == ((), {})
    with pytest.raises(KeyError):
        retry(permanent, [0.0] * 3, is_transient, sleep=SleepRecorder())()
    assert len(permanent.calls) == 1


# --- retry: delays of any kind ------------------------------------------------------------


def test_generator_delays_are_used_once() -> None:
    def delays() -> Iterator[float]:
        yield 0.1
        yield 0.2

    fn, sleep = Flaky(100), SleepRecorder()
    call = retry(fn, delays(), sleep=sleep)
    with pytest.raises(RuntimeError):
        call()
    assert len(fn.calls) == 3
    assert sleep.delays == [0.1, 0.2]
    with pytest.raises(RuntimeError):  # the generator is spent: no retry left
        call()
    assert len(fn.calls) == 4


def test_infinite_delays_retry_until_check_stops() -> None:
    fn, sleep = Flaky(100), SleepRecorder()
    call = retry(fn, itertools.repeat(0.01), lambda s, e: len(fn.calls) < 7, sleep=sleep)
    with pytest.raises(RuntimeError, match="failure 7"):
        call()
    assert sleep.delays == [0.01] * 6


def test_infinite_delays_return_on_success() -> None:
    fn = Flaky(20)
    assert retry(fn, itertools.repeat(0), sleep=SleepRecorder())() == ((), {})
    assert len(fn.calls) == 21


bad_delay_cases = [
    ([0.1, -1.0], 2, ValueError, "delay #1 must be non-negative"),
    ([math.nan], 1, ValueError, "delay #0 must be non-negative"),
    (["1"], 1, TypeError, "delay #0 must be a real number"),
]


@pytest.mark.parametrize(("delays", "calls", "expected", "message"), bad_delay_cases)
def test_a_bad_delay_raises_when_reached(
    delays: list[Any], calls: int, expected: type[Exception], message: str
) -> None:
    fn, sleep = Flaky(100), SleepRecorder()
    with pytest.raises(expected, match=message) as info:
        retry(fn, delays, sleep=sleep)()
    assert len(fn.calls) == calls
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "Flaky" in str(info.value)


def test_a_bad_delay_never_reached_is_harmless() -> None:
    fn = Flaky(1)
    assert retry(fn, [0.0, -1.0], sleep=SleepRecorder())() == ((), {})


# --- validate_delays ----------------------------------------------------------------------

valid_delay_inputs: list[Callable[[], Any]] = [
    lambda: [0.0, 1, 2.5],
    lambda: (0.5,),
    lambda: [],
    lambda: range(3),
    lambda: ExponentialBackOff(n=3),
]


@pytest.mark.parametrize("make", valid_delay_inputs)
def test_validate_delays_returns_valid_input_unchanged(make: Callable[[], Any]) -> None:
    delays = make()
    assert validate_delays(delays) is delays


invalid_delay_inputs = [
    ([0.1, -0.1], ValueError, r"delay #1 must be non-negative, got -0\.1"),
    ((math.nan,), ValueError, "delay #0 must be non-negative"),
    ([0.1, None], TypeError, "delay #1 must be a real number"),
    ([True], TypeError, "delay #0 must be a real number"),
    ("abc", TypeError, "retry delays must be numbers"),
    (b"\x01", TypeError, "retry delays must be numbers"),
]


@pytest.mark.parametrize(("delays", "expected", "message"), invalid_delay_inputs)
def test_validate_delays_rejects_bad_sequences(
    delays: Any, expected: type[Exception], message: str
) -> None:
    with pytest.raises(expected, match=message):
        validate_delays(delays)


def test_validate_delays_leaves_other_iterables_unconsumed() -> None:
    generator = (d for d in [-1.0, 2.0])
    assert validate_delays(generator) is generator
    assert list(generator) == [-1.0, 2.0]
    repeat = itertools.repeat(0.5)
    assert validate_delays(repeat) is repeat

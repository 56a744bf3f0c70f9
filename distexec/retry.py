"""Retrying a call with delays between attempts, and Julia's exponential back-off.

Julia: ``Base.retry`` and ``Base.ExponentialBackOff`` (``base/error.jl``). ``pmap``'s
``retry_delays``/``retry_check`` and the executor's retries are built on :func:`retry`.

Layer: L0 leaf. Imports: stdlib.
"""

from __future__ import annotations

import functools
import math
import numbers
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

__all__ = ["ExponentialBackOff", "retry", "validate_delays"]

P = ParamSpec("P")
R = TypeVar("R")

#: ``check(state, exc)`` returns a bool ("retry?") or a ``(new_state, retry?)`` pair.
Check = Callable[[Any, Exception], bool | tuple[Any, bool]]


_PARAM_NAMES = ("first_delay", "max_delay", "factor", "jitter")


@dataclass(frozen=True, slots=True)
class ExponentialBackOff:
    """An iterable of exactly ``n`` delays, in seconds, growing by ``factor`` up to ``max_delay``.

    Julia: ``ExponentialBackOff(; n=1, first_delay=0.05, max_delay=10.0, factor=5.0,
    jitter=0.1)``, with the same defaults and the same formula::

        d1     = min(first_delay, max_delay)
        d(k+1) = min(max_delay, d(k) * factor * (1 - jitter + 2 * jitter * rng.random()))

    The object is immutable and re-iterable: every ``iter()`` starts again from ``d1`` and
    yields ``n`` floats, so one instance can serve many calls and many threads. ``len()``
    is ``n``.

    Args:
        n: How many delays to yield (so :func:`retry` makes at most ``n + 1`` attempts).
        first_delay: The first delay, before capping at ``max_delay``.
        max_delay: The cap on every delay; ``math.inf`` means no cap.
        factor: The growth factor between consecutive delays.
        jitter: The relative spread of each growth step, in ``[0, 1]``.
        rng: Where the jitter comes from, anything with a ``random()`` method returning a
            float in ``[0, 1)``. ``None`` (the default) uses the ``random`` module's global
            generator, as Julia uses its global ``rand()``; ``random.seed`` then makes it
            reproducible. An injected generator is shared by every iteration (it is not
            re-seeded), so consecutive iterations draw different jitter, which is the point
            of jitter.

    Raises:
        TypeError: ``n`` is not an ``int``.
        ValueError: An argument is negative or NaN (``"all inputs must be non-negative"``,
            Julia's message); ``jitter`` is over 1 (it would allow a negative delay, which
            Julia does not reject); ``first_delay``, ``factor`` or ``jitter`` is infinite.
    """

    n: int = 1
    first_delay: float = 0.05
    max_delay: float = 10.0
    factor: float = 5.0
    jitter: float = 0.1
    rng: random.Random | None = field(default=None, kw_only=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int):
            raise TypeError(f"ExponentialBackOff: n must be an int, got {self.n!r}")
        params = (self.first_delay, self.max_delay, self.factor, self.jitter)
        for name, value in zip(_PARAM_NAMES, params, strict=True):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"ExponentialBackOff: {name} must be a real number, got {value!r}")
        # `not x >= 0` also rejects NaN.
        if self.n < 0 or not all(float(value) >= 0 for value in params):
            raise ValueError("all inputs must be non-negative")
        if self.jitter > 1:
            raise ValueError(
                f"ExponentialBackOff: jitter must be at most 1, got {self.jitter!r}; "
                "a larger jitter could make a delay negative"
            )
        if not all(math.isfinite(value) for value in (self.first_delay, self.factor, self.jitter)):
            raise ValueError("ExponentialBackOff: first_delay, factor and jitter must be finite")
        for name, value in zip(_PARAM_NAMES, params, strict=True):
            object.__setattr__(self, name, float(value))

    def __iter__(self) -> Iterator[float]:
        rand = random.random if self.rng is None else self.rng.random
        delay = min(self.first_delay, self.max_delay)
        for k in range(self.n):
            yield delay
            if k + 1 < self.n:
                step = delay * self.factor * (1.0 - self.jitter + 2.0 * self.jitter * rand())
                # max_delay first: min() keeps it when step is NaN (inf * 0 with max_delay=inf).
                delay = min(self.max_delay, step)

    def __len__(self) -> int:
        return self.n


def validate_delays(delays: Iterable[float]) -> Iterable[float]:
    """Reject a negative delay up front where that is possible without consuming *delays*.

    For callers such as ``pmap`` that want an argument error before any work starts rather
    than in the middle of a retry. Returns *delays* itself, unchanged.

    * An :class:`ExponentialBackOff` is valid by construction.
    * A sequence (``list``, ``tuple``, ``range``, ...) has every element checked.
    * Any other iterable (a generator, an ``itertools.repeat``) is returned unchecked:
      :func:`retry` checks each delay when it reaches it.

    Raises:
        TypeError: A sequence element is not a real number, or *delays* is a ``str``/``bytes``.
        ValueError: A sequence element is negative or NaN.
    """
    if isinstance(delays, ExponentialBackOff):
        return delays
    if isinstance(delays, (str, bytes, bytearray)):
        raise TypeError(f"retry delays must be numbers, got {type(delays).__name__} {delays!r}")
    if isinstance(delays, Sequence):
        for index, delay in enumerate(delays):
            _check_delay(delay, index)
    return delays


def _check_delay(delay: object, index: int) -> float:
    if isinstance(delay, bool) or not isinstance(delay, numbers.Real):
        raise TypeError(f"retry delay #{index} must be a real number, got {delay!r}")
    if not float(delay) >= 0:
        raise ValueError(f"retry delay #{index} must be non-negative, got {delay!r}")
    return float(delay)


#: Julia's default: one delay of 0.05 s, so two attempts. Immutable, so safe to share.
_DEFAULT_DELAYS = ExponentialBackOff()


def retry(
    fn: Callable[P, R],
    delays: Iterable[float] = _DEFAULT_DELAYS,
    check: Check | None = None,
    *,
    sleep: Callable[[float], object] = time.sleep,
) -> Callable[P, R]:
    """Return a wrapper of *fn* that calls it again, after a delay, when it raises.

    Julia: ``retry(f; delays=ExponentialBackOff(), check=nothing)``.

    For each delay in *delays*: call *fn*; if it raises an ``Exception`` and *check* is
    given, ``r = check(state, exc)`` (``state`` starts as ``None`` on every call of the
    wrapper); a 2-tuple ``r`` is ``(new_state, retry?)``, anything else is ``retry?``;
    a false ``retry?`` re-raises *exc*. Otherwise sleep for the delay and go on. When
    the delays are used up, *fn* is called one last time, unguarded, so ``n`` delays
    mean at most ``n + 1`` calls and the default (one delay) means at most two.
    ``BaseException``\\s that are not ``Exception``\\s (``KeyboardInterrupt``) are never
    retried.

    *delays* is iterated afresh on each call of the wrapper: a re-iterable (a list, a
    tuple, an :class:`ExponentialBackOff`) gives every call the full schedule, while a
    one-shot iterator (a generator) is used up by the first call that needs it, and later
    calls then get no retries. An infinite iterable retries until *check* says stop.

    Args:
        fn: The function to call.
        delays: The delays, in seconds, to sleep between attempts.
        check: Decides, from the exception, whether to retry (see above).
        sleep: Called with each delay; inject a recorder in tests, or an interruptible
            wait (``event.wait``) in services.

    Returns:
        A callable with *fn*'s signature and metadata (``functools.wraps``).

    Raises:
        ValueError: From the wrapper, when it reaches a delay that is negative or NaN
            (chained from the exception that made it retry). :func:`validate_delays`
            catches this up front for sequences.
    """

    @functools.wraps(fn)
    def retrying(*args: P.args, **kwargs: P.kwargs) -> R:
        state: Any = None
        for index, delay in enumerate(delays):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if check is not None:
                    result = check(state, exc)
                    if isinstance(result, tuple) and len(result) == 2:
                        state, again = result
                    else:
                        again = result
                    if not again:
                        raise
                try:
                    seconds = _check_delay(delay, index)
                except (TypeError, ValueError) as bad:
                    raise type(bad)(f"{fn_name}: {bad}") from exc
            sleep(seconds)
        return fn(*args, **kwargs)

    fn_name = getattr(fn, "__qualname__", repr(fn))
    return retrying

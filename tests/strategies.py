"""Hypothesis strategies shared by the test suite.

A plain module of functions returning strategies; add yours below, grouped by the
module under test.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import strategies as st

# --- distexec.retry -----------------------------------------------------------------


def backoff_kwargs(max_n: int = 20) -> st.SearchStrategy[dict[str, Any]]:
    """Valid keyword arguments for ``ExponentialBackOff`` (everything but ``rng``)."""
    return st.fixed_dictionaries(
        {
            "n": st.integers(min_value=0, max_value=max_n),
            "first_delay": st.floats(min_value=0.0, max_value=100.0),
            "max_delay": st.floats(min_value=0.0, max_value=1000.0) | st.just(math.inf),
            "factor": st.floats(min_value=0.0, max_value=50.0),
            "jitter": st.floats(min_value=0.0, max_value=1.0),
        }
    )


def seeds() -> st.SearchStrategy[int]:
    """Seeds for an injected ``random.Random``."""
    return st.integers(min_value=0, max_value=2**32 - 1)


def delay_lists(max_size: int = 6) -> st.SearchStrategy[list[float]]:
    """Short lists of valid (non-negative) retry delays."""
    return st.lists(st.floats(min_value=0.0, max_value=10.0), max_size=max_size)


# --- distexec._channel --------------------------------------------------------------


def channel_sizes() -> st.SearchStrategy[int | float]:
    """Channel sizes: unbuffered, small buffers, unbounded."""
    return st.sampled_from([0, 1, 2, 3, 5, math.inf])


def channel_ops(max_size: int = 40) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    """Sequences of non-blocking channel operations for model-based tests.

    Each op is ``("put", value)``, ``("take",)``, ``("fetch",)``, ``("wait",)``,
    ``("isready",)`` or ``("close",)``; ``put``/``take``/``fetch``/``wait`` are meant to be
    called with ``timeout=0``.
    """
    op = st.one_of(
        st.tuples(st.just("put"), st.integers()),
        st.tuples(st.just("take")),
        st.tuples(st.just("fetch")),
        st.tuples(st.just("wait")),
        st.tuples(st.just("isready")),
        st.tuples(st.just("close")),
    )
    return st.lists(op, max_size=max_size)

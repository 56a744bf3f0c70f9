"""Fixtures for the fault tests: test-scale heartbeats, executors, and what leaks."""

from __future__ import annotations

from collections.abc import Iterator

import helpers
import pytest

import distexec as dx
from distexec import _heartbeat

#: Test-scale heartbeats (production: 5 s / 30 s). The timeout is generous for a loaded
#: 2-core machine; detection times are printed, not asserted tightly.
HB_INTERVAL = 0.2
HB_TIMEOUT = 1.5


@pytest.fixture
def fast_heartbeat() -> Iterator[_heartbeat.HeartbeatSettings]:
    """Heartbeats every 0.2 s, unresponsive after 1.5 s, for one test."""
    old = _heartbeat.configure(interval=HB_INTERVAL, timeout=HB_TIMEOUT)
    try:
        yield _heartbeat.settings()
    finally:
        _heartbeat.configure(interval=old.interval, timeout=old.timeout)


@pytest.fixture
def no_heartbeat() -> Iterator[None]:
    """Heartbeats off, for tests that must see another detector (TCP) fire."""
    old = _heartbeat.configure(interval=None, timeout=_heartbeat.settings().timeout)
    try:
        yield
    finally:
        _heartbeat.configure(interval=old.interval, timeout=old.timeout)


@pytest.fixture(scope="module")
def executor() -> Iterator[dx.DistributedExecutor]:
    """A two-worker executor shared by a module; it replaces the workers tests kill."""
    with dx.DistributedExecutor(2) as ex:
        ex.submit(abs, 1).result(timeout=60)
        helpers.wait_until(lambda: ex.statistics().live_workers == 2, timeout=60, what="workers")
        yield ex
        owned = ex.workers()
    helpers.wait_until(
        lambda: not set(owned) & set(dx.workers()), timeout=30, what="the workers to be removed"
    )

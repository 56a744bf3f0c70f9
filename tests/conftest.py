"""Shared fixtures: real local workers, and checks that nothing is left behind."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
import pytest

os.environ.setdefault("DISTEXEC_WORKER_TIMEOUT", "60")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run long soaks and fuzz runs")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _live_worker_children() -> list[psutil.Process]:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = child.cmdline()
            if (
                "distexec.worker" in cmd and child.status() != psutil.STATUS_ZOMBIE
            ) or child.status() == psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[int]]:
    """Two local workers for a whole test module; removed (and checked gone) afterwards."""
    from helpers import ospid, wait_until

    import distexec as dx

    pids = dx.addprocs(2)
    ospids = [dx.remotecall_fetch(ospid, p) for p in pids]
    try:
        yield pids
    finally:
        live = [p for p in pids if p in dx.workers()]
        if live:
            dx.rmprocs(live)

        def gone() -> bool:
            return not any(c.pid in ospids for c in _live_worker_children())

        wait_until(gone, timeout=10, what="workers to exit")


@pytest.fixture
def no_leaked_workers() -> Iterator[None]:
    """Fail a test that leaves a worker process or a zombie behind."""
    before = {p.pid for p in _live_worker_children()}
    yield
    from helpers import wait_until

    wait_until(
        lambda: not ({p.pid for p in _live_worker_children()} - before),
        timeout=10,
        what="no leftover worker processes or zombies",
    )


@pytest.fixture(scope="module", autouse=True)
def _module_leaves_no_worker(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test module ends with the worker processes it started gone (and reaped)."""
    before = {p.pid for p in _live_worker_children()}
    yield
    from helpers import wait_until

    def leftover() -> list[psutil.Process]:
        return [p for p in _live_worker_children() if p.pid not in before]

    try:
        wait_until(lambda: not leftover(), timeout=10, what="the module's workers to exit")
    except AssertionError:
        described = []
        for p in leftover():
            try:
                described.append(f"{p.pid} {p.status()} {' '.join(p.cmdline())[:100]!r}")
            except psutil.NoSuchProcess:
                continue
        if described:
            raise AssertionError(
                f"{request.module.__name__} left worker processes behind: {'; '.join(described)}"
            ) from None

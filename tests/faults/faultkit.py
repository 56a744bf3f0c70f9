"""Checks shared by the fault tests (importable by name; fixtures live in conftest)."""

from __future__ import annotations

import os

import helpers
import psutil

import distexec as dx


def healthy(ex: dx.DistributedExecutor, workers: int = 2) -> None:
    """The pool-health check of the study (section 3.1): 10 fresh calls return the right
    values, and the executor has its workers back."""
    fs = [ex.submit(pow, i, 2) for i in range(10)]
    assert [f.result(timeout=60) for f in fs] == [i * i for i in range(10)]
    helpers.wait_until(
        lambda: ex.statistics().live_workers == workers, timeout=60, what="replacement workers"
    )


def live_children() -> list[psutil.Process]:
    """This process's descendants that are still alive (zombies included: they count)."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            child.status()
        except psutil.NoSuchProcess:
            continue
        out.append(child)
    return out


def zombies() -> list[psutil.Process]:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


def worker_ospids(ex: dx.DistributedExecutor) -> dict[int, int]:
    """pid -> OS pid of the executor's workers."""
    return {pid: dx.remotecall_fetch(os.getpid, pid) for pid in ex.workers()}

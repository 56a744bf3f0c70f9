"""ProcessPoolExecutor and DistributedExecutor, run through the same programs.

Layer: compat harness. Imports: stdlib, pytest, distexec, ``compat.parity``.

``test_same_program_same_observation`` runs every program of ``scenarios.SCENARIOS`` under
both executors and asserts the same observation (and the one the table expects, so that
both cannot be wrong the same way). The ``test_difference_*`` tests pin down where the two
are meant to differ: the same program, and an assertion per executor.

``ProcessPoolExecutor`` runs with the ``spawn`` start method (``DISTEXEC_PARITY_PPE_START``
overrides it): ``DistributedExecutor``'s workers are fresh interpreters too, and forking
a process that runs distexec's threads is not something a test should do.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import pickle
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest

import distexec as dx
from compat.parity import tasks
from compat.parity.scenarios import (
    PATIENCE,
    SCENARIOS,
    Env,
    Scenario,
    outcome,
    run_isolated,
    wait_until,
)

PPE_START_METHOD = os.environ.get("DISTEXEC_PARITY_PPE_START", "spawn")
KINDS = ("ppe", "dx")


def _ppe(max_workers: int | None = None, mp_context: Any = None, **kwargs: Any) -> cf.Executor:
    context = mp_context or mp.get_context(PPE_START_METHOD)
    return ProcessPoolExecutor(max_workers, context, **kwargs)


def _dx(max_workers: int | None = None, mp_context: Any = None, **kwargs: Any) -> cf.Executor:
    context = mp_context or mp.get_context(PPE_START_METHOD)
    return dx.DistributedExecutor(max_workers, context, **kwargs)


CLASSES: dict[str, Callable[..., cf.Executor]] = {"ppe": _ppe, "dx": _dx}


class Factory:
    """Makes executors of one kind and shuts down every one it made."""

    def __init__(self, make: Callable[..., cf.Executor]) -> None:
        self._make = make
        self.made: list[cf.Executor] = []

    def __call__(self, max_workers: int | None = None, **kwargs: Any) -> cf.Executor:
        ex = self._make(max_workers, **kwargs)
        self.made.append(ex)
        return ex

    def close(self) -> None:
        for ex in self.made:
            ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def shared() -> Iterator[dict[str, cf.Executor]]:
    """One two-worker executor of each kind, for the programs that leave it as they found it."""
    before = set(dx.workers())
    executors = {kind: make(2) for kind, make in CLASSES.items()}
    for ex in executors.values():  # start the workers now: each test counts them as its own
        list(ex.map(tasks.square, range(4)))
    try:
        yield executors
    finally:
        for ex in executors.values():
            ex.shutdown(wait=True, cancel_futures=True)
        assert wait_until(lambda: set(dx.workers()) <= before, timeout=PATIENCE), (
            f"DistributedExecutor workers left behind: {sorted(set(dx.workers()) - before)}"
        )


@pytest.fixture
def envs(shared: dict[str, cf.Executor], tmp_path: Path) -> Iterator[dict[str, Env]]:
    factories = {kind: Factory(make) for kind, make in CLASSES.items()}
    workers_before = set(dx.workers())
    out = {}
    for kind in KINDS:
        (tmp_path / kind).mkdir()
        out[kind] = Env(kind, factories[kind], shared[kind], tmp_path / kind)
    try:
        yield out
    finally:
        for env in out.values():
            env.open_all_gates()
        for f in factories.values():
            f.close()
        # Every DistributedExecutor made here is shut down: none of its workers may remain.
        if not wait_until(lambda: set(dx.workers()) <= workers_before, timeout=5):
            left = sorted(set(dx.workers()) - workers_before)
            dx.rmprocs(left)  # so that the next tests start clean
            pytest.fail(f"DistributedExecutor workers {left} outlived their executor's shutdown")


def _params() -> Iterator[Any]:
    for s in SCENARIOS:
        marks = [pytest.mark.xfail(strict=True, reason=s.bug)] if s.bug else []
        yield pytest.param(s, id=s.name, marks=marks)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scn", list(_params()))
def test_same_program_same_observation(scn: Scenario, envs: dict[str, Env]) -> None:
    seen = {kind: run_isolated(envs[kind], scn.run) for kind in KINDS}
    assert seen["ppe"] == scn.expected, "ProcessPoolExecutor does not do what the table says"
    assert seen["dx"] == seen["ppe"], "DistributedExecutor differs from ProcessPoolExecutor"


# ------------------------------------------------------------------------------ distexec only


@pytest.mark.timeout(60)
def test_distexec_runs_a_call_submitted_from_a_crashed_calls_callback(
    envs: dict[str, Env],
) -> None:
    # The callback runs before the executor has heard that the worker died; the call it
    # submits must not be lost on that worker (ProcessPoolExecutor refuses it: broken).
    ex = envs["dx"].make(2)
    ex.submit(tasks.square, 2).result(timeout=PATIENCE)
    crashed = ex.submit(tasks.crash, 1)
    resubmitted: list[cf.Future[Any]] = []
    crashed.add_done_callback(lambda _: resubmitted.append(ex.submit(tasks.square, 4)))
    assert isinstance(crashed.exception(timeout=PATIENCE), BrokenProcessPool)
    assert wait_until(lambda: resubmitted)
    assert outcome(lambda: resubmitted[0].result(timeout=PATIENCE)) == ("ok", 16)


# ------------------------------------------------------------------------------ differences


@pytest.mark.timeout(60)
def test_difference_lambdas_and_closures_go_only_to_distexec(envs: dict[str, Env]) -> None:
    k = 6

    def program(ex: cf.Executor) -> list[tuple[object, ...]]:
        return [
            outcome(lambda: ex.submit(lambda: k * 7).result(timeout=PATIENCE)),
            outcome(lambda: ex.submit((lambda y: lambda: y + 1)(41)).result(timeout=PATIENCE)),
            outcome(lambda: list(ex.map(lambda x: x * k, [1, 2]))),
            ("still usable", ex.submit(tasks.square, 3).result(timeout=PATIENCE)),
        ]

    ppe, dist = program(envs["ppe"].shared), program(envs["dx"].shared)
    # ProcessPoolExecutor pickles functions by reference: a lambda or a local function fails
    # (a PicklingError, or "Can't pickle local object" as an AttributeError in 3.11) ...
    pickling_errors = {"PicklingError", "AttributeError"}
    for seen in ppe[:3]:
        assert seen[0] == "raised" and seen[1] in pickling_errors and "pickle" in str(seen[2])
    # ... and the pool goes on; distexec pickles them by value (cloudpickle).
    assert ppe[3] == ("still usable", 9)
    assert dist == [("ok", 42), ("ok", 42), ("ok", [6, 12]), ("still usable", 9)]


@pytest.mark.timeout(60)
def test_difference_cancel_stops_a_running_call_only_in_distexec(envs: dict[str, Env]) -> None:
    def program(env: Env) -> dict[str, object]:
        ex = env.make(1)
        gate = env.gate()
        f = ex.submit(*gate.task("ran"))
        wait_until(f.running)
        cancelled = f.cancel()
        gate.open()
        return {
            "cancel()": cancelled,
            "result": outcome(lambda: f.result(timeout=PATIENCE))[:2],
            "next call": ex.submit(tasks.square, 3).result(timeout=PATIENCE),
        }

    # CPython cannot stop a running call: cancel() is False and the call completes.
    assert program(envs["ppe"]) == {"cancel()": False, "result": ("ok", "ran"), "next call": 9}
    # distexec interrupts it (and would replace the worker if it did not stop): cancelled.
    assert program(envs["dx"]) == {
        "cancel()": True,
        "result": ("raised", "CancelledError"),
        "next call": 9,
    }


@pytest.mark.timeout(60)
def test_difference_a_crashed_worker_breaks_only_processpoolexecutor(
    envs: dict[str, Env],
) -> None:
    def program(ex: cf.Executor) -> dict[str, object]:
        ex.submit(tasks.square, 2).result(timeout=PATIENCE)
        exc = ex.submit(tasks.crash, 1).exception(timeout=PATIENCE)
        return {
            "crashed call": exc,
            "later submit": outcome(lambda: ex.submit(tasks.square, 4).result(timeout=PATIENCE)),
            "later map": outcome(lambda: list(ex.map(tasks.square, range(3)))),
        }

    ppe = program(envs["ppe"].make(2))
    dist = program(envs["dx"].make(2))
    # The same: the crashed call's future raises a BrokenProcessPool.
    assert type(ppe["crashed call"]) is BrokenProcessPool
    assert isinstance(dist["crashed call"], BrokenProcessPool)
    # distexec says more: a WorkerLostError (a ProcessExitedException too) naming the worker.
    assert isinstance(dist["crashed call"], dx.WorkerLostError)
    assert isinstance(dist["crashed call"], dx.ProcessExitedException)
    assert dist["crashed call"].pid > 1
    # The difference: ProcessPoolExecutor is broken for good; distexec replaced the worker.
    broken = "A child process terminated abruptly, the process pool is not usable anymore"
    assert ppe["later submit"] == ("raised", "BrokenProcessPool", broken)
    assert ppe["later map"] == ("raised", "BrokenProcessPool", broken)
    assert dist["later submit"] == ("ok", 16)
    assert dist["later map"] == ("ok", [0, 1, 4])


@pytest.mark.timeout(60)
def test_difference_an_exception_that_does_not_unpickle_breaks_only_processpoolexecutor(
    envs: dict[str, Env],
) -> None:
    def program(ex: cf.Executor) -> tuple[object, object]:
        exc = ex.submit(tasks.raise_bad_init).exception(timeout=PATIENCE)
        return exc, outcome(lambda: ex.submit(tasks.square, 4).result(timeout=PATIENCE))

    ppe_exc, ppe_after = program(envs["ppe"].make(1))
    dist_exc, dist_after = program(envs["dx"].make(1))
    # CPython's result thread fails to unpickle BadInit(1, 2) and breaks the whole pool.
    assert isinstance(ppe_exc, BrokenProcessPool)
    assert ppe_after[:2] == ("raised", "BrokenProcessPool")
    # distexec substitutes a stand-in that keeps the type name and message, and goes on.
    assert isinstance(dist_exc, dx.DistexecError)
    assert type(dist_exc).__name__ == "UnpicklableRemoteError"
    assert str(dist_exc) == "compat.parity.tasks.BadInit: 1-2"
    assert dist_after == ("ok", 16)


@pytest.mark.timeout(60)
def test_difference_pickling_failures_raise_serialization_error_not_type_error(
    envs: dict[str, Env],
) -> None:
    def program(ex: cf.Executor) -> dict[str, BaseException | None]:
        return {
            "argument": ex.submit(tasks.identity, threading.Lock()).exception(timeout=PATIENCE),
            "result": ex.submit(tasks.return_lock).exception(timeout=PATIENCE),
        }

    ppe, dist = program(envs["ppe"].shared), program(envs["dx"].shared)
    for where in ("argument", "result"):
        # CPython: pickle's own TypeError, on the future.
        assert type(ppe[where]) is TypeError
        assert str(ppe[where]) == "cannot pickle '_thread.lock' object"
        # distexec: a SerializationError, which is both a pickle.PicklingError and a
        # TypeError (so `except TypeError` code written for CPython still catches it).
        exc = dist[where]
        assert isinstance(exc, dx.SerializationError)
        assert isinstance(exc, pickle.PicklingError)
        assert isinstance(exc, TypeError)
        assert str(exc).endswith("cannot pickle '_thread.lock' object")
    assert isinstance(dist["argument"].__cause__, TypeError)  # type: ignore[union-attr]


@pytest.mark.timeout(60)
def test_difference_map_with_chunks_keeps_the_results_before_the_failing_element(
    envs: dict[str, Env],
) -> None:
    def program(ex: cf.Executor) -> tuple[list[object], str]:
        got: list[object] = []
        try:
            for v in ex.map(tasks.fail_at, range(6), chunksize=2):
                got.append(v)
        except ValueError as exc:
            return got, str(exc)
        return got, "no error"

    # Chunks [0, 1], [2, 3], [4, 5]; element 3 fails. CPython loses the whole chunk, so 2's
    # result (20) never arrives; distexec yields up to the failing element itself.
    assert program(envs["ppe"].shared) == ([0, 10], "element 3 is bad")
    assert program(envs["dx"].shared) == ([0, 10, 20], "element 3 is bad")


@pytest.mark.timeout(60)
def test_workers_start_on_demand_unless_the_start_method_is_fork(envs: dict[str, Env]) -> None:
    def program(env: Env, method: str) -> tuple[int, int]:
        records = env.tmp / f"records-{method}"
        records.mkdir()
        ex = env.make(
            3,
            mp_context=mp.get_context(method),
            initializer=tasks.init_worker,
            initargs=(1, str(records)),
        )
        for i in range(3):  # one after another: the first worker is idle again each time
            ex.submit(tasks.square, i).result(timeout=PATIENCE)
        first = len(list(records.iterdir()))
        ex.shutdown()
        return first, len(list(records.iterdir()))

    # Both executors make fresh interpreters; the start method only picks the policy.
    for kind in KINDS:
        assert program(envs[kind], "spawn") == (1, 1), kind
    assert program(envs["dx"], "fork") == (3, 3)


@pytest.mark.timeout(60)
def test_difference_map_keywords_only_distexec_takes(envs: dict[str, Env]) -> None:
    ppe, dist = envs["ppe"].shared, envs["dx"].shared
    assert list(dist.map(tasks.fail_at, range(5), on_error=type)) == [0, 10, 20, ValueError, 40]
    assert list(dist.map(tasks.square, range(5), buffersize=2)) == [0, 1, 4, 9, 16]
    with pytest.raises(TypeError, match="on_error"):
        ppe.map(tasks.square, range(5), on_error=type)
    if sys.version_info < (3, 14):  # buffersize arrived in CPython 3.14
        with pytest.raises(TypeError, match="buffersize"):
            ppe.map(tasks.square, range(5), buffersize=2)

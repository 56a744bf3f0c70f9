"""Group B of the reliability study, through the executor: a serialization fault fails its
own future only (the remotecall forms are in tests/integration/test_remotecall.py).

Every row ends with the pool-health check, and a call running on the other worker at the
same time must come through.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import helpers
import pytest
from faultkit import healthy

import distexec as dx
from distexec import _cluster, _config

pytestmark = pytest.mark.timeout(180)


class ExitAtUnpickle:
    """Unpickling it ends the process (loky's ExitAtUnpickle)."""

    def __reduce__(self) -> tuple[object, ...]:
        return (os._exit, (5,))


class ExitAtPickle:
    """Pickling it raises SystemExit (CPython's ExitAtPickle): user code, failing one call."""

    def __reduce__(self) -> tuple[object, ...]:
        raise SystemExit(3)


def return_exit_at_pickle() -> ExitAtPickle:
    return ExitAtPickle()


class CrashAtUnpickle:
    """Unpickling it segfaults the process (loky's CrashAtUnpickle)."""

    def __reduce__(self) -> tuple[object, ...]:
        return (ctypes.string_at, (0,))


class HoldsALock(Exception):
    """An exception that cannot be pickled at all."""

    def __init__(self) -> None:
        super().__init__("I hold a lock")
        self.lock = threading.Lock()


def raise_holds_a_lock() -> None:
    raise HoldsALock


def return_a_lock() -> object:
    return threading.Lock()


@dataclass(frozen=True)
class Row:
    id: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    error: type[BaseException]
    text: str = ""
    worker_dies: bool = False


ROWS = [
    Row("B1 argument that cannot be pickled", helpers.identity, (threading.Lock(),),
        pickle.PicklingError, "lock"),
    Row("B2 argument that fails to unpickle on the worker", helpers.identity,
        (helpers.UnpicklableOnLoad(),), pickle.UnpicklingError, "refusing to be unpickled"),
    Row("B3 argument whose unpickling exits the worker", helpers.identity, (ExitAtUnpickle(),),
        dx.WorkerDiedError, "exited with code 5", worker_dies=True),
    Row("B3 argument whose unpickling segfaults the worker", helpers.identity,
        (CrashAtUnpickle(),), dx.WorkerDiedError, "SIGSEGV", worker_dies=True),
    Row("B4 result that cannot be pickled", return_a_lock, (), pickle.PicklingError, "lock"),
    Row("B4 result whose pickling raises SystemExit on the worker", return_exit_at_pickle, (),
        pickle.PicklingError, "SystemExit"),
    Row("B5 exception that cannot be pickled", raise_holds_a_lock, (),
        dx.errors.UnpicklableRemoteError, "HoldsALock"),
    Row("B6 exception that pickles but does not unpickle", helpers.raise_bad_init, (),
        dx.errors.UnpicklableRemoteError, "BadInit"),
    Row("B7 result whose unpickling raises SystemExit here", helpers.return_exit_on_load, (),
        dx.DeserializationError, "SystemExit"),
]  # fmt: skip


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_executor_serialization_fault_stays_local(
    executor: dx.DistributedExecutor, row: Row
) -> None:
    healthy(executor)
    replaced = executor.statistics().replaced_workers
    other = executor.submit(helpers.sleep_and_return, 0.3)
    helpers.wait_until(other.running, timeout=30, what="the other call to start")
    fut = executor.submit(row.fn, *row.args)
    with pytest.raises(row.error) as info:
        fut.result(timeout=60)
    assert row.text in str(info.value), str(info.value)
    assert other.result(timeout=60) == 0.3
    healthy(executor)
    assert executor.statistics().replaced_workers == replaced + (1 if row.worker_dies else 0)


def test_class_missing_on_the_worker(executor: dx.DistributedExecutor, tmp_path: Any) -> None:
    """B2: an argument whose class lives in a module the workers cannot import."""
    healthy(executor)
    (tmp_path / "dx_only_here.py").write_text("class Thing:\n    pass\n")
    sys.path.insert(0, str(tmp_path))  # the workers started before: their path lacks it
    try:
        import dx_only_here

        fut = executor.submit(helpers.identity, dx_only_here.Thing())
        with pytest.raises(pickle.UnpicklingError, match="dx_only_here"):
            fut.result(timeout=60)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("dx_only_here", None)
    healthy(executor)


def test_argument_over_the_frame_cap_fails_at_the_sender(no_leaked_workers: None) -> None:
    """B8: the worker says its frame cap (1 MiB here) in its hello; a call whose pickled
    argument (in the body, or as an out-of-band buffer) is over it fails at the sender with
    FrameTooLargeError, in every call form; nothing was sent, so the link and the worker
    live on."""
    import numpy as np

    (pid,) = dx.addprocs(1, env={"DISTEXEC_MAX_FRAME_BYTES": str(1 << 20)})
    try:
        with pytest.raises(dx.errors.FrameTooLargeError, match="exceeds the peer's frame cap"):
            dx.remotecall_fetch(len, pid, bytes(2 << 20))
        with pytest.raises(dx.errors.FrameTooLargeError, match="out-of-band buffer"):
            dx.remotecall(len, pid, np.zeros(2 << 20, np.uint8))
        with pytest.raises(dx.errors.FrameTooLargeError):
            dx.remote_do(len, pid, bytes(2 << 20))
        with dx.DistributedExecutor(pool=[pid]) as ex:
            with pytest.raises(dx.errors.FrameTooLargeError):
                ex.submit(len, bytes(2 << 20)).result(timeout=60)
            assert ex.submit(len, bytes(1 << 19)).result(timeout=60) == 1 << 19
        assert dx.remotecall_fetch(abs, pid, -1) == 1
        assert pid in dx.workers()
    finally:
        if pid in dx.workers():
            dx.rmprocs(pid)


def test_result_over_the_callers_cap_fails_that_call(
    monkeypatch: pytest.MonkeyPatch, no_leaked_workers: None
) -> None:
    """B8, the other way: the master's cap (256 KiB) is in its hello, so a worker whose
    value is over it sends FrameTooLargeError back as that call's error instead; the link
    and the worker live on. Also for a Future's value, whether it would have been pushed
    along with the completion notice (under 1 MiB) or fetched later."""
    import numpy as np

    cap = 256 << 10
    monkeypatch.setattr(_config, "MAX_FRAME_BYTES", cap)
    (pid,) = dx.addprocs(1)
    try:
        with pytest.raises(dx.errors.FrameTooLargeError, match="could not send this value"):
            dx.remotecall_fetch(bytes, pid, 2 * cap)
        with pytest.raises(dx.errors.FrameTooLargeError, match="out-of-band buffer"):
            dx.remotecall_fetch(np.ones, pid, 2 * cap, np.uint8)
        for size in (2 * cap, 4 << 20):  # sent with the notice / kept there until fetched
            fut = dx.remotecall(bytes, pid, size)
            with pytest.raises(dx.errors.FrameTooLargeError, match="exceeds the peer's frame cap"):
                fut.fetch(timeout=60)
        assert dx.remotecall_fetch(abs, pid, -1) == 1
        assert dx.remotecall(bytes, pid, cap // 2).fetch(timeout=60) == bytes(cap // 2)
        assert pid in dx.workers()
    finally:
        if pid in dx.workers():
            dx.rmprocs(pid)


def test_frame_cap_is_checked_before_allocating(no_leaked_workers: None) -> None:
    """B8, the receiver's check: a peer that sends past the cap it was told (here the
    master's reader cap is lowered after the hello, so the worker does not know) is refused
    from its length prefix (nothing allocated), the link is dropped, and the error says why."""
    (pid,) = dx.addprocs(1)
    peer = _cluster.group().peer(pid)
    assert peer is not None and peer.conn is not None
    peer.conn._reader._max = 1 << 20  # the cap the worker was not told
    with pytest.raises(dx.WorkerDiedError, match="exceeds the cap"):
        dx.remotecall_fetch(bytes, pid, 2 << 20)
    assert pid not in dx.workers()

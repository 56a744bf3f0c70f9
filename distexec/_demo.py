"""The demo that ``python -m distexec`` (or ``distexec``) runs with no arguments.

Starts two local workers, shows remotecall, a Future, pmap and the executor, says what it
did and how long each step took, and removes its workers.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any


def _step(title: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    value = fn()
    ms = (time.perf_counter() - t0) * 1000
    print(f"  {title:<58} {ms:8.1f} ms   -> {value!r}"[:160])
    return value


def main() -> int:
    import distexec as dx

    print(f"distexec {dx.__version__} demo: pid 1 is this process (os pid {os.getpid()})")
    pids = _step("addprocs(2): start two local workers", lambda: dx.addprocs(2))
    try:
        w = pids[0]
        _step(
            f"remotecall_fetch(math.sqrt, {w}, 2.0)", lambda: dx.remotecall_fetch(math.sqrt, w, 2.0)
        )
        _step(
            "workers' os pids (they are separate processes)",
            lambda: [dx.remotecall_fetch(os.getpid, p) for p in pids],
        )
        fut = _step(
            f"remotecall(sum, {pids[1]}, range(10**6)) returns a Future",
            lambda: dx.remotecall(sum, pids[1], range(10**6)),
        )
        _step("fetch(future)", lambda: dx.fetch(fut))
        _step(
            "a closure travels by value: remotecall_fetch(lambda: k * 2)",
            lambda: dx.remotecall_fetch(lambda: pids[0] * 2, w),
        )
        try:
            dx.remotecall_fetch(math.sqrt, w, -1.0)
        except dx.RemoteException as exc:
            inner = exc.captured.ex
            print(
                f"  {'a remote error keeps its type:':<58} {'':>11}   -> "
                f"RemoteException(pid={exc.pid}, {type(inner).__name__}: {inner})"
            )
        _step(
            "pmap(lambda x: x * x, range(10))",
            lambda: dx.pmap(lambda x: x * x, range(10)),
        )
        _step(
            "pmap over 100,000 ints, batch_size='auto' (sum shown)",
            lambda: sum(dx.pmap(abs, range(-50_000, 50_000), batch_size="auto")),
        )
        _step(
            "pmap with on_error: failures replaced, not raised",
            lambda: dx.pmap(lambda x: 1 / x, [1, 0, 2], on_error=lambda e: type(e).__name__),
        )
        with dx.DistributedExecutor(max_workers=2) as ex:
            _step(
                "DistributedExecutor: submit(pow, 2, 100).result()",
                lambda: ex.submit(pow, 2, 100).result(),
            )
            _step(
                "executor.map(math.factorial, range(10), chunksize=4)",
                lambda: list(ex.map(math.factorial, range(10), chunksize=4)),
            )
            dead = ex.submit(os._exit, 1)
            _step(
                "a worker dies: only its future fails, the pool goes on",
                lambda: (type(dead.exception(timeout=30)).__name__, ex.submit(abs, -7).result()),
            )
        _step("statistics()", lambda: dx.statistics().workers)
    finally:
        _step("rmprocs(workers): remove them, nothing left running", lambda: dx.rmprocs(pids))
    print(f"  workers() is now {dx.workers()}; done.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

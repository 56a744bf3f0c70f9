"""Nothing lost (study E2, E3): pmap returns exactly ``list(map(f, xs))`` under injected
failures and while workers are SIGKILLed one after another.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time

import helpers
import pytest

import distexec as dx

pytestmark = pytest.mark.timeout(300)

_CHAOS_PERIOD = 0.4  # seconds between two kills


def work(x: int) -> int:
    """A little arithmetic, so that the chaos has something to interrupt."""
    acc = 0
    for i in range(20):
        acc += i
    return 3 * x + 1 + acc - acc


def test_pmap_100k_with_a_worker_killed_every_second(no_leaked_workers: None) -> None:
    """E3 at test scale: 100,000 single-element calls; every 0.4 s (the study's every second,
    sped up as the run is short: about 2 s here) a chaos thread adds a worker to the pool and
    SIGKILLs a random other one. With retry_delays, every element comes back exactly once,
    in order, with the right value."""
    seed = int(os.environ.get("DISTEXEC_CHAOS_SEED", random.randrange(1 << 30)))
    print(f"chaos seed {seed} (DISTEXEC_CHAOS_SEED={seed} to replay)")
    rng = random.Random(seed)
    pool = dx.WorkerPool(dx.addprocs(2))
    stop = threading.Event()
    kills: list[float] = []
    errors: list[BaseException] = []

    def chaos() -> None:
        try:
            while not stop.wait(_CHAOS_PERIOD):
                (new,) = dx.addprocs(1)
                pool.push(new)
                victims = [p for p in pool.workers() if p != new]
                if not victims or stop.is_set():
                    continue
                victim = rng.choice(victims)
                try:
                    ospid = dx.remotecall_fetch(os.getpid, victim)
                except dx.ProcessExitedException:
                    continue
                os.kill(ospid, signal.SIGKILL)
                kills.append(time.monotonic())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    xs = range(100_000)
    thread = threading.Thread(target=chaos, name="chaos", daemon=True)
    t0 = time.monotonic()
    thread.start()
    try:
        out = dx.pmap(work, xs, pool=pool, batch_size=1, retry_delays=[0.01] * 8)
    finally:
        stop.set()
        thread.join(60)
        live = [p for p in pool.workers() if p in dx.workers()]
        dx.rmprocs(live)  # also when the test fails: later tests must not see them
    elapsed = time.monotonic() - t0
    print(f"100,000 elements, {len(kills)} workers SIGKILLed: {elapsed:.1f} s")
    assert not errors, errors
    assert len(out) == len(xs)
    assert out == [work(x) for x in xs]  # no element missing, duplicated or misplaced
    assert len(kills) >= 2, f"the chaos thread killed {len(kills)} worker(s) only"


def test_pmap_exact_run_counts_with_injected_failures(no_leaked_workers: None) -> None:
    """E2 at test scale: 100,000 elements, auto batch size, 1 % of them (seeded) fail on
    their first attempt. The output is exact, each failing element ran exactly twice and
    every other element exactly once (counted on the workers)."""
    seed = 20261126
    rng = random.Random(seed)
    n = 100_000
    failing = frozenset(rng.sample(range(n), n // 100))
    helpers.reset_attempts()
    pids = dx.addprocs(2)
    try:
        t0 = time.monotonic()
        out = dx.pmap(
            helpers.square_failing_once,
            range(n),
            [failing] * n,
            pool=dx.WorkerPool(pids),
            batch_size="auto",
            retry_delays=[0.01] * 3,
        )
        elapsed = time.monotonic() - t0
        assert out == [x * x for x in range(n)]
        runs: collections.Counter[int] = collections.Counter()
        for p in pids:
            runs.update(dx.remotecall_fetch(helpers.runs, p))
        twice = [x for x, k in runs.items() if k == 2]
        assert sorted(twice) == sorted(failing)
        assert all(runs[x] == 1 for x in range(n) if x not in failing)
        assert sum(runs.values()) == n + len(failing)
        print(
            f"100,000 elements, {len(failing)} failing once (seed {seed}): {elapsed:.1f} s; "
            f"{sum(runs.values())} runs in all"
        )
    finally:
        dx.rmprocs(pids)

"""The soak (study E4): hundreds of calls per second with 64 KiB arguments and results, for
``DISTEXEC_SOAK_SECONDS`` (default 60; the nightly run sets 600), while RSS, threads and
file descriptors of the master and of each worker are sampled every second. After a
warm-up they must stay flat: fds within +-2, threads in a band of 4 without a rising trend,
RSS growing by less than 16 MiB (the slope is printed).
"""

from __future__ import annotations

import collections
import os
import statistics
import time

import helpers
import psutil
import pytest

import distexec as dx

SECONDS = float(os.environ.get("DISTEXEC_SOAK_SECONDS", "60"))
RATE = 300.0  # calls per second
WINDOW = 16  # calls in flight at most
PAYLOAD = 64 * 1024

pytestmark = pytest.mark.timeout(int(SECONDS) + 240)


def _reverse(data: bytes) -> bytes:
    return data[::-1]


def _slope_mib_per_min(samples: list[tuple[float, int]]) -> float:
    if len(samples) < 3:
        return 0.0
    ts = [t for t, _ in samples]
    ys = [v / (1 << 20) for _, v in samples]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    num = sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True))
    den = sum((t - mt) ** 2 for t in ts) or 1.0
    return num / den * 60.0


def test_soak_stays_flat(no_leaked_workers: None) -> None:
    me = psutil.Process()
    payload = os.urandom(PAYLOAD)
    expected = payload[::-1]
    with dx.DistributedExecutor(2) as ex:
        ex.submit(abs, 1).result(timeout=60)
        helpers.wait_until(lambda: ex.statistics().live_workers == 2, timeout=60, what="workers")
        workers = [psutil.Process(dx.remotecall_fetch(os.getpid, p)) for p in ex.workers()]
        procs = {"master": me, **{f"worker {w.pid}": w for w in workers}}
        series: dict[str, dict[str, list[tuple[float, int]]]] = collections.defaultdict(
            lambda: collections.defaultdict(list)
        )
        latencies: list[tuple[float, float]] = []
        inflight: collections.deque[tuple[float, object]] = collections.deque()
        start = time.monotonic()
        next_sample = start
        sent = done = 0
        while True:
            now = time.monotonic()
            elapsed = now - start
            if now >= next_sample:
                for name, p in procs.items():
                    series[name]["rss"].append((elapsed, p.memory_info().rss))
                    series[name]["fds"].append((elapsed, p.num_fds()))
                    series[name]["threads"].append((elapsed, p.num_threads()))
                next_sample += 1.0
            if elapsed >= SECONDS and not inflight:
                break
            while inflight and (len(inflight) >= WINDOW or elapsed >= SECONDS):
                t_sent, fut = inflight.popleft()
                assert fut.result(timeout=60) == expected  # type: ignore[attr-defined]
                latencies.append((t_sent - start, time.monotonic() - t_sent))
                done += 1
            if elapsed < SECONDS and sent < RATE * elapsed:
                inflight.append((time.monotonic(), ex.submit(_reverse, payload)))
                sent += 1
            elif elapsed < SECONDS:
                time.sleep(min(0.002, max(0.0, (sent + 1) / RATE - elapsed)))  # pacing
        total = time.monotonic() - start
    warm = max(5.0, SECONDS / 5)
    print(f"\nsoak: {done} calls in {total:.0f} s ({done / total:.0f}/s), 64 KiB each way")
    first = [lat for t, lat in latencies if t < warm + 60]
    late = [lat for t, lat in latencies if t >= SECONDS - 60] or first
    p99_first = statistics.quantiles(first, n=100)[98] if len(first) > 100 else max(first)
    p99_late = statistics.quantiles(late, n=100)[98] if len(late) > 100 else max(late)
    print(f"  p99 latency: first minute {p99_first * 1000:.1f} ms, last {p99_late * 1000:.1f} ms")
    failures = []
    for name, kinds in series.items():
        after = {k: [(t, v) for t, v in s if t >= warm] for k, s in kinds.items()}
        slope = _slope_mib_per_min(after["rss"])
        rss = [v for _, v in after["rss"]]
        growth = (rss[-1] - rss[0]) / (1 << 20)
        fds = [v for _, v in after["fds"]]
        threads = [v for _, v in after["threads"]]
        print(
            f"  {name}: RSS {rss[0] / (1 << 20):.1f} -> {rss[-1] / (1 << 20):.1f} MiB "
            f"(slope {slope:+.2f} MiB/min), fds {min(fds)}..{max(fds)}, "
            f"threads {min(threads)}..{max(threads)}"
        )
        if max(fds) - fds[0] > 2 or fds[0] - min(fds) > 2:
            failures.append(f"{name}: fds moved from {fds[0]} to {min(fds)}..{max(fds)}")
        # A runner starts a thread when calls overlap and retires it after 30 s idle: the
        # count moves in a band; a leak would make it climb.
        third = max(1, len(threads) // 3)
        first, last = statistics.median(threads[:third]), statistics.median(threads[-third:])
        if max(threads) - min(threads) > 4 or last - first > 1:
            failures.append(f"{name}: threads {threads[0]} -> {threads[-1]} (band {threads})")
        if growth > 16:
            failures.append(f"{name}: RSS grew by {growth:.1f} MiB after the warm-up")
    assert done == sent and done >= RATE * SECONDS * 0.5
    assert not failures, failures

"""The measurements, registered per (case, backend).

Layer: tooling (``python -m distexec.bench``). Imports: stdlib and the bench's own modules;
numpy inside the bandwidth and caching_pool cases, ``_sshd`` inside the SSH cases.

``lookup(case, backend)`` returns the function registered for exactly that pair, else the one
registered for ``"*"`` (every backend), else None (the cell reads ``n/a``). A measurement gets a
prepared backend: for ``lifecycle="warm"`` the driver has also started its workers and had each
answer one call, and stops them afterwards; ``lifecycle="own"`` measurements (startup) start
and stop the backend themselves.
"""

from __future__ import annotations

import importlib
import math
import os
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from distexec.bench import _procs
from distexec.bench._backends import Backend, BenchUnavailable

Lifecycle = Literal["warm", "own"]


@dataclass(slots=True)
class Outcome:
    """What one driver reports: numbers keyed as the case's metrics, and context."""

    metrics: dict[str, float]
    info: dict[str, object] = field(default_factory=dict)


MeasureFn = Callable[[Backend, Mapping[str, Any]], Outcome]


@dataclass(frozen=True, slots=True)
class Measurement:
    """A registered measurement and who starts the workers for it."""

    fn: MeasureFn
    lifecycle: Lifecycle


MEASUREMENTS: dict[tuple[str, str], Measurement] = {}


def measure(
    case: str, *, backends: Iterable[str] = ("*",), lifecycle: Lifecycle = "warm"
) -> Callable[[MeasureFn], MeasureFn]:
    """Decorator: register *fn* as the measurement of *case* for *backends* (``"*"``: all)."""

    def deco(fn: MeasureFn) -> MeasureFn:
        for backend in backends:
            if (case, backend) in MEASUREMENTS:
                raise ValueError(f"measurement ({case!r}, {backend!r}) is registered twice")
            MEASUREMENTS[(case, backend)] = Measurement(fn, lifecycle)
        return fn

    return deco


def lookup(case: str, backend: str) -> Measurement | None:
    """The measurement for *backend* in *case*, or None if it has none."""
    return MEASUREMENTS.get((case, backend)) or MEASUREMENTS.get((case, "*"))


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile *q* (0, 100] of already sorted values."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _round_trips(b: Backend, fn: Callable[[Any], Any], p: Mapping[str, Any]) -> Outcome:
    """Sequential ``call(fn, i)``, *fn* an identity: per-call median and p99, calls per second."""
    for i in range(p["warmup"]):
        b.call(fn, i)
    clock = time.perf_counter_ns
    samples: list[int] = []
    calls = p["calls"]
    t_start = clock()
    for i in range(calls):
        t0 = clock()
        r = b.call(fn, i)
        samples.append(clock() - t0)
    total = clock() - t_start
    if r != calls - 1:
        raise AssertionError(f"identity({calls - 1}) returned {r!r}")
    samples.sort()
    us = [s / 1e3 for s in samples]
    return Outcome(
        {
            "median_us": statistics.median(us),
            "p99_us": percentile(us, 99),
            "mean_us": statistics.fmean(us),
            "calls_per_s": calls / (total / 1e9),
        },
        {"function": f"{fn.__module__}.{fn.__qualname__}"},
    )


@measure("latency")
def latency(b: Backend, p: Mapping[str, Any]) -> Outcome:
    """Sequential ``call(identity, i)``: per-call median and p99, and calls per second."""
    return _round_trips(b, b.tasks.identity, p)


#: Name of the identity function the driver defines in ``__main__`` (``_driver.main_identity``).
MAIN_IDENTITY = "main_identity"


def main_function(name: str = MAIN_IDENTITY) -> Callable[[Any], Any]:
    """``__main__.<name>``: a function defined at the top level of the running script.

    The driver defines it: run as ``python -m distexec.bench._driver``, its module is
    ``__main__``. Anywhere else (the driver imported under its own name, run in-process by a
    test) this raises, rather than measure an importable function under a ``__main__`` label.
    """
    main = sys.modules.get("__main__")
    fn = getattr(main, name, None)
    if not isinstance(fn, types.FunctionType) or fn.__module__ != "__main__":
        what = f"{fn.__module__}.{fn.__qualname__}" if isinstance(fn, types.FunctionType) else fn
        raise RuntimeError(
            f"__main__.{name} is {what}, not a function of __main__ ({main!r}): the *_main "
            "cases need the driver run as python -m distexec.bench._driver"
        )
    return fn


def _main_or_floor(b: Backend) -> Callable[[Any], Any]:
    """The ``__main__`` identity; a raw floor's workers resolve functions by reference in their
    own ``__main__`` (``dxb_echo``), so floors keep the importable one."""
    return b.tasks.identity if b.kind == "floor" else main_function()


@measure("latency_main")
def latency_main(b: Backend, p: Mapping[str, Any]) -> Outcome:
    """``latency`` with a function of the driver's ``__main__`` (raw floors: by reference)."""
    return _round_trips(b, _main_or_floor(b), p)


def _timed_map(b: Backend, fn: Any, items: list[int], chunksize: int) -> float:
    t0 = time.perf_counter()
    out = b.map(fn, items, chunksize)
    dt = time.perf_counter() - t0
    if len(out) != len(items) or out[-1] != items[-1] or out[0] != items[0]:
        raise AssertionError(f"map(identity, chunksize={chunksize}) returned a different list")
    return dt


@measure("throughput")
def throughput(b: Backend, p: Mapping[str, Any]) -> Outcome:
    """``map(identity, range(items))`` at each chunk size; the best items/s and its chunk size."""
    fn = b.tasks.identity
    items = list(range(p["items"]))
    if b.map(fn, items[:2000], 100) != items[:2000]:  # warm-up, and one full equality check
        raise AssertionError("map(identity) returned a different list")
    metrics: dict[str, float] = {}
    for cs in p["chunksizes"]:
        times = [_timed_map(b, fn, items, cs) for _ in range(p["inner"])]
        metrics[f"items_per_s@{cs}"] = len(items) / statistics.median(times)
    best = max(p["chunksizes"], key=lambda cs: metrics[f"items_per_s@{cs}"])
    metrics["best_items_per_s"] = metrics[f"items_per_s@{best}"]
    metrics["best_chunksize"] = best
    return Outcome(metrics)


def _unbatched(b: Backend, fn: Callable[[Any], Any], p: Mapping[str, Any]) -> Outcome:
    """``map(fn, range(items), chunksize=1)``, *fn* an identity: one task per item."""
    items = list(range(p["items"]))
    b.map(fn, items[:100], 1)
    return Outcome(
        {"items_per_s": len(items) / _timed_map(b, fn, items, 1)},
        {"function": f"{fn.__module__}.{fn.__qualname__}"},
    )


@measure("throughput_unbatched")
def throughput_unbatched(b: Backend, p: Mapping[str, Any]) -> Outcome:
    """``map(identity, range(items), chunksize=1)``: one task per item."""
    return _unbatched(b, b.tasks.identity, p)


@measure("throughput_unbatched_main")
def throughput_unbatched_main(b: Backend, p: Mapping[str, Any]) -> Outcome:
    """``throughput_unbatched`` with a function of the driver's ``__main__`` (floors: by
    reference)."""
    return _unbatched(b, _main_or_floor(b), p)


@measure("bandwidth")
def bandwidth(b: Backend, p: Mapping[str, Any]) -> Outcome:
    """A float64 array to a worker: one way (reply is an int) and round trip (reply is it)."""
    try:
        import numpy as np
    except ImportError:
        raise BenchUnavailable("numpy not installed") from None
    size = p["size_bytes"]
    a = np.arange(size // 8, dtype=np.float64)
    r = b.call(b.tasks.identity, a)
    if not np.array_equal(r, a):
        raise AssertionError("identity(a) came back different")
    del r
    if b.call(b.tasks.nbytes, a) != a.nbytes:
        raise AssertionError("nbytes(a) came back wrong")
    one_way: list[float] = []
    round_trip: list[float] = []
    for _ in range(p["transfers"]):
        t0 = time.perf_counter()
        b.call(b.tasks.nbytes, a)
        one_way.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = b.call(b.tasks.identity, a)
        round_trip.append(time.perf_counter() - t0)
        del r  # freeing 100 MB is not part of the transfer
    ow = statistics.median(one_way)
    rt = statistics.median(round_trip)
    return Outcome(
        {
            "one_way_ms": ow * 1e3,
            "one_way_MBps": size / 1e6 / ow,
            "round_trip_ms": rt * 1e3,
            "round_trip_MBps": 2 * size / 1e6 / rt,
        },
        {
            "one_way_ms_all": [t * 1e3 for t in one_way],
            "round_trip_ms_all": [t * 1e3 for t in round_trip],
        },
    )


def time_import(stmt: str) -> float:
    """Milliseconds *stmt* takes in a fresh interpreter (its start-up not included)."""
    code = f"import time\nt = time.perf_counter()\n{stmt}\nprint(time.perf_counter() - t)\n"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        raise RuntimeError(f"{stmt!r} failed in a fresh interpreter: {tail[0]}")
    return float(proc.stdout.split()[-1]) * 1e3


@measure("startup", lifecycle="own")
def startup(b: Backend, p: Mapping[str, Any]) -> Outcome:
    """From nothing to every worker having answered one call, then teardown."""
    import_ms = time_import(b.import_stmt)
    t0 = time.perf_counter()
    b.start(p["workers"])
    pids = b.ping_all()
    t1 = time.perf_counter()
    b.settle()
    t2 = time.perf_counter()
    b.stop()
    t3 = time.perf_counter()
    if len(set(pids)) != p["workers"]:
        raise AssertionError(f"{p['workers']} workers expected, answers came from {pids}")
    ready = (t1 - t0) * 1e3
    return Outcome(
        {
            "ready_ms": ready,
            "import_ms": import_ms,
            "total_ms": import_ms + ready,
            "teardown_ms": (t3 - t2) * 1e3,
        },
        {"worker_pids": pids},
    )


def _closure_over(a: Any) -> Callable[[int], float]:
    """A function that pickles by value and carries *a* along, as a user's lambda does."""

    def item(i: int) -> float:
        return float(a[i])

    return item


@measure("caching_pool", backends=("distexec",))
def caching_pool(b: Backend, p: Mapping[str, Any]) -> Outcome:
    """A closure over an array through a fresh CachingPool (cold, then warm), against a
    module-level function through a WorkerPool after the array was stashed by hand."""
    try:
        import numpy as np
    except ImportError:
        raise BenchUnavailable("numpy not installed") from None
    dx = importlib.import_module("distexec")
    pids = [w for w in dx.workers() if w != 1]
    size = p["array_bytes"]
    a = np.arange(size // 8, dtype=np.float64)
    f = _closure_over(a)
    idx = range(p["calls"])
    want = [float(x) for x in a[: p["calls"]]]
    clock = time.perf_counter

    def sent() -> int:
        return int(dx.statistics().bytes_sent)

    def check(what: str, out: list[Any]) -> None:
        if out != want:
            raise AssertionError(f"{what}: pmap returned a different list")

    def caching() -> dict[str, float]:
        pool = dx.CachingPool(pids)
        try:
            b0 = sent()
            t0 = clock()
            cold = dx.pmap(f, idx, pool=pool)
            t1 = clock()
            b1 = sent()
            warm = dx.pmap(f, idx, pool=pool)
            t2 = clock()
            b2 = sent()
        finally:
            pool.clear()
        check("cold", cold)
        check("warm", warm)
        return {"cold": t1 - t0, "warm": t2 - t1, "cold_b": b1 - b0, "warm_b": b2 - b1}

    def by_hand() -> dict[str, float]:
        pool = dx.WorkerPool(pids)
        b0 = sent()
        t0 = clock()
        shipped = [dx.fetch(fut) for fut in [dx.remotecall(b.tasks.stash, w, a) for w in pids]]
        t1 = clock()
        plain = dx.pmap(b.tasks.stashed_item, idx, pool=pool)
        t2 = clock()
        b2 = sent()
        for w in pids:
            dx.remotecall_fetch(b.tasks.unstash, w)
        if shipped != [a.nbytes] * len(pids):
            raise AssertionError(f"stash(a) answered {shipped}")
        check("plain", plain)
        return {"ship": t1 - t0, "plain": t2 - t1, "hand_b": b2 - b0}

    caching()  # untimed: the workers import numpy, pages are touched once
    by_hand()
    rounds: list[dict[str, float]] = []
    for r in range(p["rounds"]):
        first, second = (caching, by_hand) if r % 2 == 0 else (by_hand, caching)
        rounds.append({**first(), **second()})

    def med(fn: Callable[[dict[str, float]], float]) -> float:
        return statistics.median(fn(x) for x in rounds)

    crossings = med(lambda x: (x["cold_b"] - x["warm_b"]) / size)
    return Outcome(
        {
            "cold_ms": med(lambda x: x["cold"]) * 1e3,
            "warm_ms": med(lambda x: x["warm"]) * 1e3,
            "ship_ms": med(lambda x: x["ship"]) * 1e3,
            "plain_ms": med(lambda x: x["plain"]) * 1e3,
            "cold_ratio": med(lambda x: x["cold"] / (x["ship"] + x["plain"])),
            "warm_ratio": med(lambda x: x["warm"] / x["plain"]),
            "cold_vs_plain": med(lambda x: x["cold"] / x["plain"]),
            "cold_MB": med(lambda x: x["cold_b"]) / 1e6,
            "crossings": round(crossings),
        },
        {
            "workers": pids,
            "crossings_exact": crossings,
            "rounds_ms": [
                {k: v * 1e3 for k, v in x.items() if not k.endswith("_b")} for x in rounds
            ],
            "bytes_sent": [{k: v for k, v in x.items() if k.endswith("_b")} for x in rounds],
        },
    )


# -- opt-in cases over SSH: distexec only (other backends: n/a) -------------------------------


def _ready_then_remove(
    dx: Any, b: Backend, arg: Any, kw: Mapping[str, Any], check: Callable[[list[int]], None]
) -> tuple[float, float, list[int]]:
    """``addprocs(arg, **kw)`` until each new worker answered one call, then ``rmprocs``:
    (ready ms, teardown ms, the workers' OS pids). *check* sees the pids, untimed."""
    before = set(dx.workers())
    t0 = time.perf_counter()
    try:
        pids = dx.addprocs(arg, **kw)
        futures = [dx.remotecall(b.tasks.worker_pid, pid) for pid in pids]
        ospids = [dx.fetch(f) for f in futures]
        t1 = time.perf_counter()
        check(ospids)
        t2 = time.perf_counter()
        dx.rmprocs(pids)
        t3 = time.perf_counter()
    finally:
        left = [p for p in dx.workers() if p != 1 and p not in before]
        if left:
            dx.rmprocs(left)
    return (t1 - t0) * 1e3, (t3 - t2) * 1e3, ospids


@measure("startup_ssh", backends=("distexec",), lifecycle="own")
def startup_ssh(b: Backend, p: Mapping[str, Any]) -> Outcome:
    """4 workers over SSH to 127.0.0.1, and 4 local ones, each until all answered a call."""
    import tempfile
    from pathlib import Path

    from distexec.bench._sshd import SSHD

    dx = importlib.import_module("distexec")
    n = p["workers"]
    kinds = ("ssh", "mux", "local")
    ready: dict[str, list[float]] = {k: [] for k in kinds}
    teardown: dict[str, list[float]] = {k: [] for k in kinds}
    setup: dict[str, list[float]] = {"ssh": [], "mux": []}
    ospids: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory(prefix="dxb-ssh-") as tmp, SSHD(Path(tmp)) as server:
        server.check()
        sshd_pid = server.pid

        def distinct(which: str) -> Callable[[list[int]], None]:
            def check(pids: list[int]) -> None:
                if len(set(pids)) != n or os.getpid() in pids:
                    raise AssertionError(f"{n} {which} workers expected, answers from {pids}")
                if which != "local" and sshd_pid is not None:
                    under = set(_procs.descendants(sshd_pid))
                    if not set(pids) <= under:
                        raise AssertionError(f"ssh workers {pids} are not sshd {sshd_pid}'s")
                ospids[which] = sorted(pids)

            return check

        runs: dict[str, tuple[Any, dict[str, Any]]] = {
            "ssh": ([(server.destination, n)], server.addprocs_kw()),
            "mux": ([(server.destination, n)], {**server.addprocs_kw(), "multiplex": True}),
            "local": (n, {}),
        }
        for r in range(p["rounds"]):
            setup["ssh"].append(server.time_logins(n))
            setup["mux"].append(server.time_logins(1))
            for which in kinds[r % 3 :] + kinds[: r % 3]:
                arg, kw = runs[which]
                up, down, _ = _ready_then_remove(dx, b, arg, kw, distinct(which))
                ready[which].append(up)
                teardown[which].append(down)
    med = {k: statistics.median(v) for k, v in ready.items()}
    med_down = {k: statistics.median(v) for k, v in teardown.items()}
    med_setup = {k: statistics.median(v) for k, v in setup.items()}
    local = med["local"]
    return Outcome(
        {
            "ssh_ready_ms": med["ssh"],
            "mux_ready_ms": med["mux"],
            "local_ready_ms": local,
            "ready_ratio": med["ssh"] / local,
            "mux_ratio": med["mux"] / local,
            "ssh_setup_ms": med_setup["ssh"],
            "mux_setup_ms": med_setup["mux"],
            "ready_ratio_setup_aside": (med["ssh"] - med_setup["ssh"]) / local,
            "mux_ratio_setup_aside": (med["mux"] - med_setup["mux"]) / local,
            "ssh_teardown_ms": med_down["ssh"],
            "local_teardown_ms": med_down["local"],
            "teardown_ratio": med_down["ssh"] / med_down["local"],
        },
        {
            "ssh_worker_ospids": ospids["ssh"],
            "mux_worker_ospids": ospids["mux"],
            "local_worker_ospids": ospids["local"],
            "ready_ms_all": ready,
            "teardown_ms_all": teardown,
            "setup_ms_all": setup,
            "destination": server.destination,
        },
    )


def _link_integrity(pid: int) -> bool | None:
    """Whether the master's link to *pid* carries frame MACs (None: cannot tell)."""
    try:
        from distexec import _cluster

        peer = _cluster.group().peer(pid)
        return None if peer is None or peer.conn is None else bool(peer.conn.integrity)
    except Exception:
        return None


def _netns_of(ospid: int) -> str:
    try:
        return os.readlink(f"/proc/{ospid}/ns/net")
    except OSError:
        return "?"


@measure("latency_ssh", backends=("distexec",), lifecycle="own")
def latency_ssh(b: Backend, p: Mapping[str, Any]) -> Outcome:
    """Sequential round trips to an SSH worker in another namespace and to two local ones."""
    import tempfile
    from pathlib import Path

    from distexec.bench._sshd import SSHD

    dx = importlib.import_module("distexec")
    fn = b.tasks.identity
    # This process's own wish counts too (either side asking for MACs wins): make it "auto",
    # whatever the caller's environment says, so the local worker's link really has none.
    os.environ["DISTEXEC_INTEGRITY"] = "auto"
    with (
        tempfile.TemporaryDirectory(prefix="dxb-ssh-") as tmp,
        SSHD(Path(tmp), netns=True) as server,
    ):
        server.check()
        pids: dict[str, int] = {}
        try:
            # The ssh worker first: workers dial lower pids, and it cannot reach 127.0.0.1 here.
            [pids["ssh"]] = dx.addprocs(
                [server.destination], **server.addprocs_kw({"DISTEXEC_INTEGRITY": "auto"})
            )
            [pids["local"]] = dx.addprocs(1, env={"DISTEXEC_INTEGRITY": "auto"})
            [pids["local_mac"]] = dx.addprocs(1, env={"DISTEXEC_INTEGRITY": "frame"})
            ospids = {k: dx.remotecall_fetch(b.tasks.worker_pid, pid) for k, pid in pids.items()}
            integrity = {k: _link_integrity(pid) for k, pid in pids.items()}
            want = {"ssh": True, "local": False, "local_mac": True}
            if integrity != want:
                raise AssertionError(f"frame MACs per link: {integrity}, expected {want}")
            here = _netns_of(os.getpid())
            if _netns_of(ospids["ssh"]) in (here, "?") or _netns_of(ospids["local"]) != here:
                raise AssertionError("the ssh worker is not in the other network namespace")
            for pid in pids.values():
                for i in range(p["warmup"]):
                    dx.remotecall_fetch(fn, pid, i)
            clock = time.perf_counter_ns
            samples: dict[str, list[int]] = {k: [] for k in pids}
            order = list(pids)
            blocks = p["blocks"]
            per_block = -(-p["calls"] // blocks)
            for blk in range(blocks):
                k = blk % len(order)
                for name in [*order[k:], *order[:k]]:
                    pid, out = pids[name], samples[name]
                    for i in range(per_block):
                        t0 = clock()
                        r = dx.remotecall_fetch(fn, pid, i)
                        out.append(clock() - t0)
                    if r != per_block - 1:
                        raise AssertionError(f"identity({per_block - 1}) returned {r!r}")
        finally:
            live = [w for w in dx.workers() if w != 1]
            if live:
                dx.rmprocs(live)
    stats: dict[str, float] = {}
    for name, ns in samples.items():
        us = sorted(s / 1e3 for s in ns)
        stats[f"{name}_median_us"] = statistics.median(us)
        stats[f"{name}_p99_us"] = percentile(us, 99)
    return Outcome(
        {
            **stats,
            "ratio": stats["ssh_median_us"] / stats["local_median_us"],
            "ratio_mac": stats["ssh_median_us"] / stats["local_mac_median_us"],
        },
        {
            "p99_ratio": stats["ssh_p99_us"] / stats["local_p99_us"],
            "p99_ratio_mac": stats["ssh_p99_us"] / stats["local_mac_p99_us"],
            "calls_per_worker": len(samples["ssh"]),
            "frame_macs": integrity,
            "worker_ospids": ospids,
            "ssh_host": server.host,
            "ssh_netns": server.netns,
        },
    )

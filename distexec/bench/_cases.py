"""What each benchmark case measures: parameters, metrics, and the words printed above its table.

Layer: tooling (``python -m distexec.bench``). Imports: stdlib.

A ``Case`` is metadata only, shared by the orchestrator and the drivers; the code that measures
lives in ``_measure`` and is registered per (case, backend). To add a case: ``register_case``
a ``Case`` here and decorate its measurement with ``@measure("name")`` in ``_measure``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class Settings:
    """The command line's say in every case's parameters."""

    quick: bool = False
    #: Bandwidth payload in MB (1 MB = 1e6 bytes); None: the case's default.
    size_mb: float | None = None


@dataclass(frozen=True, slots=True)
class Metric:
    """One number a driver reports for a case."""

    key: str
    #: Column header, with the unit.
    label: str
    #: Which way is good; None for a number that is not a figure of merit (a chunk size).
    better: Literal["lower", "higher"] | None = None
    #: Short name for the ratio columns; None: no ratios on this metric.
    ratio: str | None = None
    #: How repetitions combine: the median, or the most frequent value (for a choice).
    summary: Literal["median", "mode"] = "median"
    #: Whether the table shows min-max next to the median (JSON always has them).
    show_range: bool = True


@dataclass(frozen=True, slots=True)
class Case:
    """A benchmark case: what it runs, with which parameters, and how to read it."""

    name: str
    title: str
    params: Callable[[Settings], dict[str, Any]]
    metrics: Callable[[Mapping[str, Any]], tuple[Metric, ...]]
    #: What exactly is measured, given the parameters: printed under the title.
    explain: Callable[[Mapping[str, Any]], str]
    #: Seconds a driver may take before it is killed (``--quick`` caps it at 60).
    timeout_s: float = 180.0
    #: Part of a run that does not name its cases.
    default: bool = True
    #: The backend of the first ratio columns (JSON key ``vs_<reference>``).
    reference: str = "ppe"

    def primary(self, params: Mapping[str, Any]) -> Metric:
        """The metric that picks the floor: the first one with ratios."""
        return next(m for m in self.metrics(params) if m.ratio)


CASES: dict[str, Case] = {}


def register_case(case: Case) -> Case:
    """Make *case* available as ``--cases case.name`` (order of registration = order of run)."""
    if case.name in CASES:
        raise ValueError(f"case {case.name!r} is registered twice")
    CASES[case.name] = case
    return case


WORKERS = 2


def _latency_params(s: Settings) -> dict[str, Any]:
    return {"workers": WORKERS, "warmup": 50 if s.quick else 300, "calls": 500 if s.quick else 5000}


def _latency_metrics(p: Mapping[str, Any]) -> tuple[Metric, ...]:
    return (
        Metric("median_us", "median µs", "lower", ratio="median"),
        Metric("p99_us", "p99 µs", "lower"),
        Metric("calls_per_s", "calls/s", "higher"),
    )


#: How the ``*_main`` cases get their function; said in their text.
_MAIN_FUNCTION = (
    "The function is main_identity, defined at the top level of the driver, which runs as "
    "python -m distexec.bench._driver: a function of __main__, as one in a user's script is "
    "(checked: its __module__ is '__main__'). distexec and loky workers do not import the "
    "master's script, so it travels by value (cloudpickle, with whatever caching the library "
    "does); ProcessPoolExecutor pickles it by reference and its workers find it in their copy "
    "of __main__ (fork; spawn and forkserver re-import the driver as __mp_main__). The raw "
    "floors still name dxb_tasks.identity by reference (their workers' __main__ is their own "
    "script), so ÷ floor includes the by-value cost."
)

register_case(
    Case(
        name="latency",
        title="sequential round trips of identity(i)",
        params=_latency_params,
        metrics=_latency_metrics,
        explain=lambda p: (
            f"{p['calls']} calls one after another after {p['warmup']} warm-up calls, on one of "
            f"{p['workers']} workers; per-call µs (median, p99 within a driver); calls/s = calls "
            "/ total time. Raw floors name the function by reference, as pickle does."
        ),
        timeout_s=120.0,
    )
)

register_case(
    Case(
        name="latency_main",
        title="sequential round trips of identity(i), identity defined in __main__",
        params=_latency_params,
        metrics=_latency_metrics,
        explain=lambda p: (
            f"as latency: {p['calls']} calls one after another after {p['warmup']} warm-up "
            f"calls, on one of {p['workers']} workers (distexec: remotecall_fetch; executors: "
            "submit().result()); per-call µs (median, p99 within a driver); calls/s = calls / "
            f"total time. {_MAIN_FUNCTION}"
        ),
        timeout_s=120.0,
    )
)

register_case(
    Case(
        name="throughput",
        title="map identity over small ints, best chunk size",
        params=lambda s: {
            "workers": WORKERS,
            "items": 20_000 if s.quick else 200_000,
            "chunksizes": [100, 1000, 5000] if s.quick else [1000, 10_000, 25_000],
            "inner": 1 if s.quick else 3,
        },
        metrics=lambda p: (
            Metric("best_items_per_s", "best items/s", "higher", ratio="best"),
            Metric("best_chunksize", "chunk", summary="mode"),
            *(
                Metric(f"items_per_s@{cs}", f"cs={cs}", "higher", show_range=False)
                for cs in p["chunksizes"]
            ),
        ),
        explain=lambda p: (
            f"list(map(identity, range({p['items']}))) across {p['workers']} workers: "
            "ProcessPoolExecutor/loky/DistributedExecutor .map(chunksize=cs), distexec "
            "pmap(batch_size=cs), raw floors pipelined chunks. Each chunk size runs "
            f"{p['inner']} time(s) per driver (median); 'best' is the best chunk size of each "
            "repetition, 'chunk' the one that was best most often; cs=N columns: items/s, median."
        ),
    )
)

register_case(
    Case(
        name="throughput_unbatched",
        title="map identity over small ints, one item per task",
        params=lambda s: {"workers": WORKERS, "items": 1000 if s.quick else 20_000},
        metrics=lambda p: (Metric("items_per_s", "items/s", "higher", ratio="items/s"),),
        explain=lambda p: (
            f"as throughput, {p['items']} items, chunksize=1 (distexec: pmap batch_size=1; raw "
            "floors keep up to 8 requests in flight per worker)."
        ),
    )
)

register_case(
    Case(
        name="throughput_unbatched_main",
        title="map identity over small ints, one item per task, identity defined in __main__",
        params=lambda s: {"workers": WORKERS, "items": 1000 if s.quick else 20_000},
        metrics=lambda p: (Metric("items_per_s", "items/s", "higher", ratio="items/s"),),
        explain=lambda p: (
            f"as throughput_unbatched: list(map(identity, range({p['items']}))) across "
            f"{p['workers']} workers, chunksize=1 (distexec: pmap batch_size=1; raw floors keep "
            f"up to 8 requests in flight per worker). {_MAIN_FUNCTION}"
        ),
    )
)


def _bandwidth_params(s: Settings) -> dict[str, Any]:
    size_mb = s.size_mb if s.size_mb is not None else (10.0 if s.quick else 100.0)
    return {
        "workers": WORKERS,
        "size_bytes": int(size_mb * 1e6) // 8 * 8,
        "transfers": 2 if s.quick else 5,
    }


register_case(
    Case(
        name="bandwidth",
        title="a large float64 numpy array to a worker (and back)",
        params=_bandwidth_params,
        metrics=lambda p: (
            Metric("one_way_ms", "one way ms", "lower", ratio="1-way"),
            Metric("one_way_MBps", "one way MB/s", "higher"),
            Metric("round_trip_ms", "round trip ms", "lower", ratio="rt"),
            Metric("round_trip_MBps", "round trip MB/s", "higher"),
        ),
        explain=lambda p: (
            f"a = {p['size_bytes'] / 1e6:g} MB of float64. one way: f(a) returns a.nbytes, so "
            "the array crosses once; round trip: f(a) returns a, so it crosses twice. MB/s = "
            "bytes that crossed (1 or 2 times the array, 1 MB = 1e6 bytes) / time. Each driver: "
            f"1 warm-up (checked equal), then the median of {p['transfers']} timed transfers "
            "each way. Raw floors: pickle 5 buffers out of band, received into huge-page memory."
        ),
        timeout_s=300.0,
    )
)

register_case(
    Case(
        name="startup",
        title="nothing → 2 workers that each answered one call",
        params=lambda s: {"workers": WORKERS},
        metrics=lambda p: (
            Metric("ready_ms", "ready ms", "lower", ratio="ready"),
            Metric("import_ms", "import ms", "lower"),
            Metric("total_ms", "total ms", "lower"),
            Metric("teardown_ms", "teardown ms", "lower"),
        ),
        explain=lambda p: (
            "ready = from creating the pool (addprocs, Popen) until every one of "
            f"{p['workers']} workers answered a call, in a driver that already imported the "
            "library; import = the library's import statement timed in a fresh interpreter; "
            "total = import + ready; teardown = shutdown/rmprocs until it returned. The raw "
            "floors start fresh interpreters (the addprocs way); ppe forks (on Linux)."
        ),
        timeout_s=120.0,
    )
)

register_case(
    Case(
        name="caching_pool",
        title="a closure over a large array through a CachingPool, against a module-level function",
        params=lambda s: {
            "workers": WORKERS,
            "array_bytes": 10_000_000 if s.quick else 50_000_000,
            "calls": 100,
            "rounds": 2 if s.quick else 5,
        },
        metrics=lambda p: (
            Metric("cold_ms", "cold ms", "lower", ratio="cold"),
            Metric("warm_ms", "warm ms", "lower"),
            Metric("ship_ms", "ship ms", "lower"),
            Metric("plain_ms", "plain ms", "lower"),
            Metric("cold_ratio", "cold÷(ship+plain)", "lower"),
            Metric("warm_ratio", "warm÷plain", "lower"),
            Metric("cold_vs_plain", "cold÷plain", "lower", show_range=False),
            Metric("cold_MB", "cold MB sent", show_range=False),
            Metric("crossings", "closure crossings", summary="mode"),
        ),
        explain=lambda p: (
            f"a = {p['array_bytes'] / 1e6:g} MB of float64 on pid 1, {p['workers']} workers, "
            f"{p['calls']} calls per figure, each pmap(f, range({p['calls']}), pool=...) with "
            "batch_size=1. cold = a fresh CachingPool, f = a closure returning float(a[i]): "
            "the closure (and a) ships once per worker inside the timing; warm = "
            f"{p['calls']} more calls through that pool. The module-level way, by hand: "
            "ship = remotecall(stash, pid, a) on every worker until all answered (what "
            "@everywhere does); plain = a WorkerPool, f = stashed_item, a module-level "
            "function returning float(a[i]) of the stashed array. Targets: cold÷(ship+plain) "
            "and warm÷plain ≤ 1.2. cold÷plain leaves the data's transfer on one side only. "
            "cold MB sent: bytes pid 1 sent during cold; crossings: (cold - warm bytes) ÷ "
            f"array bytes, {p['workers']} = once per worker. Per driver: one untimed round "
            f"(the workers import numpy), then {p['rounds']} rounds, the CachingPool and "
            "the by-hand way in an order alternating per round (median of rounds)."
        ),
        timeout_s=120.0,
    )
)


# -- opt-in: over SSH (``--cases all`` or by name; they start their own sshd) -----------------

SSH_WORKERS = 4

register_case(
    Case(
        name="startup_ssh",
        title=f"nothing → {SSH_WORKERS} workers over SSH to 127.0.0.1, against {SSH_WORKERS} local",
        params=lambda s: {"workers": SSH_WORKERS, "rounds": 1 if s.quick else 2},
        metrics=lambda p: (
            Metric("ssh_ready_ms", "ssh ready ms", "lower", ratio="ssh ready"),
            Metric("mux_ready_ms", "ssh mux ready ms", "lower"),
            Metric("local_ready_ms", "local ready ms", "lower"),
            Metric("ready_ratio", "ready ssh÷local", "lower"),
            Metric("mux_ratio", "ready mux÷local", "lower"),
            Metric("ssh_setup_ms", f"{p['workers']} logins ms", "lower", show_range=False),
            Metric("mux_setup_ms", "1 login ms", "lower", show_range=False),
            Metric("ready_ratio_setup_aside", "(ssh - logins)÷local", "lower"),
            Metric("mux_ratio_setup_aside", "(mux - login)÷local", "lower"),
            Metric("ssh_teardown_ms", "ssh teardown ms", "lower", show_range=False),
            Metric("local_teardown_ms", "local teardown ms", "lower", show_range=False),
            Metric("teardown_ratio", "teardown ssh÷local", "lower", show_range=False),
        ),
        explain=lambda p: (
            f"ready = from addprocs until each of {p['workers']} workers answered one call, to "
            "an sshd of the bench's own on 127.0.0.1: ssh = addprocs([('user@127.0.0.1:PORT', "
            f"{p['workers']})]), the default: one ssh connection (login, remote login shell) "
            "per worker; ssh mux = the same with multiplex=True: one master connection and "
            f"{p['workers']} sessions over it (each still runs the remote login shell, and the "
            f"master's lifeline one more); local = addprocs({p['workers']}). Same driver, "
            f"{p['rounds']} round(s) of each, order rotated per round (median of rounds). "
            "Before any timing: keys, sshd and one 'ssh true' check. teardown = rmprocs until "
            "it returned. The ratios are ssh ÷ local within each driver. Set-up aside (the "
            f"issue's target, ≤ 1.2 times): {p['workers']} logins = {p['workers']} concurrent "
            "'ssh user@127.0.0.1 true' until all returned, 1 login = one of them, each timed "
            "in the same round; taken off the ssh and the mux figures respectively."
        ),
        timeout_s=180.0,
        default=False,
    )
)

register_case(
    Case(
        name="latency_ssh",
        title="round trips of identity(i) to a worker over SSH in another network namespace",
        params=lambda s: {
            "warmup": 50 if s.quick else 300,
            "calls": 300 if s.quick else 3000,
            "blocks": 3 if s.quick else 10,
        },
        metrics=lambda p: (
            Metric("ssh_median_us", "ssh median µs", "lower", ratio="ssh median"),
            Metric("ssh_p99_us", "ssh p99 µs", "lower", show_range=False),
            Metric("local_median_us", "local median µs", "lower"),
            Metric("local_p99_us", "local p99 µs", "lower", show_range=False),
            Metric("ratio", "ssh÷local", "lower"),
            Metric("local_mac_median_us", "local+MAC median µs", "lower"),
            Metric("local_mac_p99_us", "local+MAC p99 µs", "lower", show_range=False),
            Metric("ratio_mac", "ssh÷local+MAC", "lower"),
        ),
        explain=lambda p: (
            "remotecall_fetch(identity, pid, i) one after another, to three workers of one "
            "driver: ssh = started over SSH inside a network namespace of the bench's own, "
            "reached over a veth (198.19.x.2): plain TCP to another address, so "
            "DISTEXEC_INTEGRITY=auto puts a MAC on every frame; local = addprocs(1), AF_UNIX, "
            "auto: no MACs; local+MAC = addprocs(1) with DISTEXEC_INTEGRITY=frame, MACs "
            "like the ssh link. Each link's integrity is checked. "
            f"{p['calls']} timed calls per worker after {p['warmup']} warm-up calls, in "
            f"{p['blocks']} blocks taking the workers in turn (rotated order); per-call µs, "
            "median and p99 within a driver. ssh÷local: as deployed (MACs on the ssh link "
            "only); ssh÷local+MAC: like for like. Target ≤ 1.2 times."
        ),
        timeout_s=180.0,
        default=False,
    )
)

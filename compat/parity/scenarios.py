"""The parity table: programs written for ``ProcessPoolExecutor``, each with what it observes.

Layer: compat harness. Imports: stdlib, ``compat.parity.tasks``.

Every scenario is one program, written against the ``concurrent.futures`` interface only. It
gets an :class:`Env` (an executor factory, a shared two-worker executor, a scratch folder)
and returns what it observed: results, exception types and messages, future states. The
test runs each program once under ``ProcessPoolExecutor`` and once under
``DistributedExecutor``, and asserts that both observations equal ``expected``.

``bug`` names a distexec bug that makes ``DistributedExecutor`` observe something else; the
test marks that scenario ``xfail(strict=True)``, so fixing the bug turns it into a failure
that says "remove the mark".

Programs never sleep to let something happen: they block workers on :class:`Gate`\\ s (a
file a task waits for) and wait on conditions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import hashlib
import itertools
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compat.parity import tasks

#: How long a program waits for something that should happen at once (worker start included).
PATIENCE = 30.0


@dataclass
class Env:
    """What a scenario runs with, for one executor kind."""

    #: ``"ppe"`` (``ProcessPoolExecutor``) or ``"dx"`` (``DistributedExecutor``).
    kind: str
    #: ``make(max_workers, **kwargs)``: a new executor of this kind; the test shuts it down.
    make: Callable[..., cf.Executor]
    #: Two workers, shared by the scenarios that leave it as they found it.
    shared: cf.Executor
    #: A scratch folder of this run.
    tmp: Path
    _gates: list[Gate] = field(default_factory=list)

    def dx_only(self, **kwargs: Any) -> dict[str, Any]:
        """Keywords that only ``DistributedExecutor`` takes (empty for ``ProcessPoolExecutor``)."""
        return kwargs if self.kind == "dx" else {}

    def gate(self) -> Gate:
        """A new closed gate; the test opens every gate at the end, so no worker stays blocked."""
        g = Gate(str(self.tmp / f"gate-{len(self._gates)}"))
        self._gates.append(g)
        return g

    def open_all_gates(self) -> None:
        for g in self._gates:
            g.open()


@dataclass(frozen=True)
class Gate:
    """A file that :func:`tasks.wait_for_file` waits for: a task blocks until it is opened."""

    path: str

    def open(self) -> None:
        Path(self.path).touch()

    def task(self, value: object) -> tuple[Callable[..., object], str, object]:
        """``submit(*gate.task(v))`` runs a task that returns *v* once the gate is open."""
        return tasks.wait_for_file, self.path, value


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Env], object]
    expected: object
    bug: str | None = None


SCENARIOS: list[Scenario] = []


def scenario(
    expected: object, *, bug: str | None = None
) -> Callable[[Callable[[Env], object]], Callable[[Env], object]]:
    def register(fn: Callable[[Env], object]) -> Callable[[Env], object]:
        SCENARIOS.append(Scenario(fn.__name__, fn, expected, bug))
        return fn

    return register


# ------------------------------------------------------------------------------ helpers


def outcome(call: Callable[[], object]) -> tuple[object, ...]:
    """``("ok", value)`` or ``("raised", type name, message)``."""
    try:
        return ("ok", call())
    except BaseException as exc:
        return ("raised", type(exc).__name__, str(exc))


def broken_or(call: Callable[[], object]) -> object:
    """The value, or ``"BrokenProcessPool"`` for that class or any subclass of it."""
    try:
        return call()
    except BrokenProcessPool:
        return "BrokenProcessPool"


def wait_until(pred: Callable[[], object], timeout: float = PATIENCE) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(2 * delay, 0.02)
    return True


def child_processes() -> set[int]:
    """This process's descendants, zombies included (a zombie is a process not cleaned up).

    multiprocessing's resource tracker is left out: it is started once, on first use, and
    lives as long as this process, whichever executor made it start.
    """
    import psutil

    out = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" in " ".join(
                child.cmdline()
            ):
                continue
            out.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return out


def state(f: cf.Future[Any]) -> object:
    """``("done", value)``, ``("failed", type name)``, ``"cancelled"``, ``"running"``, ..."""
    if f.cancelled():
        return "cancelled"
    if f.done():
        exc = f.exception()
        return ("done", f.result()) if exc is None else ("failed", type(exc).__name__)
    return "running" if f.running() else "pending"


# ------------------------------------------------------------------------------ map


@scenario(
    expected={
        "plain": [x * x for x in range(20)],
        "finishing_out_of_order": list(range(10)),
        "chunked": [x * x for x in range(20)],
        "generator": [0, 1, 4, 9, 16],
        "lazy_iterator_type": True,
    }
)
def map_keeps_input_order(env: Env) -> object:
    ex = env.shared
    it = ex.map(tasks.square, range(20))
    return {
        "plain": list(it),
        # later elements finish first: results still come in input order
        "finishing_out_of_order": list(ex.map(tasks.inverse_sleep, range(10))),
        "chunked": list(ex.map(tasks.square, range(20), chunksize=3)),
        "generator": list(ex.map(tasks.square, (x for x in range(5)))),
        "lazy_iterator_type": isinstance(it, Iterator),
    }


@scenario(
    expected={
        "two": [2, 9, 64],
        "two_chunked": [2, 9, 64],
        "three": [0, 3, 6],
        "endless_and_short": [1, 4],
        "none": [],
        "one_empty": [],
    }
)
def map_over_several_iterables_stops_at_the_shortest(env: Env) -> object:
    ex = env.shared
    return {
        "two": list(ex.map(tasks.power, [2, 3, 4, 5], [1, 2, 3])),
        "two_chunked": list(ex.map(tasks.power, [2, 3, 4, 5], [1, 2, 3], chunksize=2)),
        "three": list(ex.map(tasks.add, range(5), range(10), range(3))),
        "endless_and_short": list(ex.map(tasks.power, itertools.count(1), [2, 2])),
        "none": list(ex.map(tasks.add)),
        "one_empty": list(ex.map(tasks.add, [], [1])),
    }


@scenario(
    expected={
        "yielded": [0, 10, 20],
        "type": "ValueError",
        "message": "element 3 is bad",
        "cause_is_an_exception": True,
        'cause_is_framed_in_"""': True,
        "cause_names_the_function": True,
        "cause_quotes_the_source_line": True,
        "cause_ends_with_the_error": True,
        "printed_with_remote_frames": True,
    }
)
def map_raises_at_the_failing_element_with_the_remote_traceback(env: Env) -> object:
    got: list[object] = []
    try:
        for v in env.shared.map(tasks.fail_at, range(6)):
            got.append(v)
    except ValueError as exc:
        cause = exc.__cause__
        text = str(cause)
        printed = "".join(traceback.format_exception(exc))
        return {
            "yielded": got,
            "type": type(exc).__name__,
            "message": str(exc),
            "cause_is_an_exception": isinstance(cause, Exception),
            'cause_is_framed_in_"""': text.startswith('\n"""\nTraceback (most recent call last):')
            and text.endswith('"""'),
            "cause_names_the_function": ", in fail_at\n" in text,
            "cause_quotes_the_source_line": 'raise ValueError(f"element {x} is bad")' in text,
            "cause_ends_with_the_error": text.endswith('ValueError: element 3 is bad\n"""'),
            "printed_with_remote_frames": "The above exception was the direct cause" in printed
            and ", in fail_at\n" in printed,
        }
    return {"yielded": got, "raised": False}


@scenario(
    expected={
        "map": ("raised", "ValueError", "chunksize must be >= 1."),
        "map_timeout": ("raised", "TimeoutError", ""),
        "after": [1, 2],
    }
)
def map_checks_chunksize_and_honours_timeout(env: Env) -> object:
    ex = env.shared
    gate = env.gate()
    it = ex.map(tasks.wait_for_file, [gate.path] * 2, [1, 2], timeout=0.1)
    seen = {
        "map": outcome(lambda: list(ex.map(tasks.square, range(3), chunksize=0))),
        "map_timeout": outcome(lambda: next(it)),
    }
    gate.open()
    seen["after"] = list(ex.map(tasks.wait_for_file, [gate.path] * 2, [1, 2]))
    return seen


# ------------------------------------------------------------------------------ submit


@scenario(
    expected={
        "KeyError": ("KeyError", ("k",), None),
        "OSError": ("FileNotFoundError", (2, "nope"), "f.txt"),
        "user class": ("ParityError", ("m", 7), 7),
        "SystemExit": ("SystemExit", (3,), 3),
        "each has a remote traceback": True,
        "still usable": 4,
    }
)
def submit_raises_the_original_exception(env: Env) -> object:
    ex = env.shared
    calls: dict[str, tuple[Callable[..., object], tuple[object, ...]]] = {
        "KeyError": (tasks.raise_key_error, ("k",)),
        "OSError": (tasks.raise_os_error, (2, "nope", "f.txt")),
        "user class": (tasks.raise_parity_error, ("m", 7)),
        "SystemExit": (tasks.raise_system_exit, (3,)),
    }
    seen: dict[str, object] = {}
    tracebacks = []
    for label, (fn, args) in calls.items():
        exc = ex.submit(fn, *args).exception(timeout=PATIENCE)
        assert exc is not None
        extra = getattr(exc, "filename", None) or getattr(exc, "code", None)
        seen[label] = (type(exc).__name__, exc.args, extra)
        tracebacks.append(f", in {fn.__name__}\n" in str(exc.__cause__))
    seen["each has a remote traceback"] = all(tracebacks)
    seen["still usable"] = ex.submit(tasks.square, 2).result(timeout=PATIENCE)
    return seen


@scenario(
    expected={
        "result": ("raised", "TimeoutError", ""),
        "exception": ("raised", "TimeoutError", ""),
        "is cf.TimeoutError": True,
        "done before": False,
        "after": ("ok", "v"),
    }
)
def result_with_timeout_raises_timeout_error(env: Env) -> object:
    gate = env.gate()
    f = env.shared.submit(*gate.task("v"))
    seen: dict[str, object] = {
        "result": outcome(lambda: f.result(timeout=0.05)),
        "exception": outcome(lambda: f.exception(timeout=0.01)),
    }
    try:
        f.result(timeout=0.01)
    except cf.TimeoutError:
        seen["is cf.TimeoutError"] = True
    seen["done before"] = f.done()
    gate.open()
    seen["after"] = outcome(lambda: f.result(timeout=PATIENCE))
    return seen


@scenario(
    expected={
        "keywords named like submit's own": ((1,), {"fn": 2, "self": 3}),
        "a 4 MB argument": hashlib.sha256(bytes(range(256)) * 16384).hexdigest(),
        "run_in_executor": 49,
        "done callback": ["called"],
    }
)
def submit_passes_arguments_through(env: Env) -> object:
    ex = env.shared
    blob = bytes(range(256)) * 16384
    back = ex.submit(tasks.identity, blob).result(timeout=PATIENCE)

    async def via_asyncio() -> object:
        return await asyncio.get_running_loop().run_in_executor(ex, tasks.square, 7)

    called: list[str] = []
    done = threading.Event()
    f = ex.submit(tasks.square, 1)
    f.add_done_callback(lambda _: (called.append("called"), done.set()))
    done.wait(PATIENCE)
    return {
        "keywords named like submit's own": ex.submit(tasks.echo_kwargs, 1, fn=2, self=3).result(
            timeout=PATIENCE
        ),
        "a 4 MB argument": hashlib.sha256(back).hexdigest(),  # type: ignore[arg-type]
        "run_in_executor": asyncio.run(via_asyncio()),
        "done callback": called,
    }


# ------------------------------------------------------------------------------ cancel, shutdown


@scenario(
    expected={
        "cancel": [True, True, True, True],
        "states": [("done", 0), ("done", 1), "cancelled", "cancelled", "cancelled", "cancelled"],
        "result of a cancelled one": ("raised", "CancelledError", ""),
    }
)
def cancel_of_calls_not_yet_started_succeeds(env: Env) -> object:
    # One worker; every call blocks on the gate. ProcessPoolExecutor moves max_workers + 1
    # calls to its call queue (RUNNING); the rest stay PENDING, and those are cancelled.
    # (cancel() of a RUNNING call differs: see test_parity's differences.)
    ex = env.make(1)
    gate = env.gate()
    fs = [ex.submit(*gate.task(i)) for i in range(6)]
    wait_until(lambda: fs[1].running())
    cancelled = [f.cancel() for f in fs[2:]]
    gate.open()
    cf.wait(fs, timeout=PATIENCE)
    return {
        "cancel": cancelled,
        "states": [state(f) for f in fs],
        "result of a cancelled one": outcome(lambda: fs[-1].result(timeout=0)),
    }


@scenario(
    expected={
        "done while the first blocks": [False, False, False, False, False],
        "cancel the pending ones": [True, True, True, True],
        "states": [("done", 0), ("done", 1), "cancelled", "cancelled", "cancelled", "cancelled"],
    },
)
def calls_behind_a_long_one_wait_their_turn_and_can_be_cancelled(env: Env) -> object:
    # The plain program: a 1-worker pool blocked by a long call; the later (quick) calls
    # must wait for it, and the ones not yet handed to the worker can be cancelled.
    ex = env.make(1)
    gate = env.gate()
    fs = [ex.submit(*gate.task(0))] + [ex.submit(tasks.identity, i) for i in range(1, 6)]
    wait_until(lambda: fs[0].running())
    wait_until(lambda: fs[-1].done(), timeout=0.3)  # give a wrong executor time to be wrong
    done_early = [f.done() for f in fs[1:]]
    cancelled = [f.cancel() for f in fs[2:]]
    gate.open()
    cf.wait(fs, timeout=PATIENCE)
    return {
        "done while the first blocks": done_early,
        "cancel the pending ones": cancelled,
        "states": [state(f) for f in fs],
    }


@scenario(
    expected={
        "states": [("done", 0), ("done", 1), "cancelled", "cancelled", "cancelled", "cancelled"],
        "submit after": ("raised", "RuntimeError", "cannot schedule new futures after shutdown"),
    }
)
def shutdown_cancel_futures_cancels_what_has_not_started(env: Env) -> object:
    ex = env.make(1)
    gate = env.gate()
    fs = [ex.submit(*gate.task(i)) for i in range(6)]
    wait_until(lambda: fs[1].running())
    opener = threading.Timer(0.2, gate.open)  # shutdown(wait=True) blocks until then
    opener.start()
    ex.shutdown(wait=True, cancel_futures=True)
    opener.join()
    return {
        "states": [state(f) for f in fs],
        "submit after": outcome(lambda: ex.submit(tasks.square, 1)),
    }


@scenario(
    expected={
        "results": [0, 1, 2, 3, 4, 5],
        "submit after": ("raised", "RuntimeError", "cannot schedule new futures after shutdown"),
    }
)
def shutdown_without_waiting_still_delivers_results(env: Env) -> object:
    ex = env.make(2)
    fs = [ex.submit(tasks.sleep_then, i, 0.02) for i in range(6)]
    ex.shutdown(wait=False)
    return {
        "results": [f.result(timeout=PATIENCE) for f in fs],
        "submit after": outcome(lambda: ex.submit(tasks.square, 1)),
    }


@scenario(
    expected={
        "before": 4,
        "second shutdown": ("ok", None),
        "submit": ("raised", "RuntimeError", "cannot schedule new futures after shutdown"),
        "map": ("raised", "RuntimeError", "cannot schedule new futures after shutdown"),
        "never used, then submit": (
            "raised",
            "RuntimeError",
            "cannot schedule new futures after shutdown",
        ),
    }
)
def submit_after_shutdown_raises_runtime_error(env: Env) -> object:
    ex = env.make(1)
    seen: dict[str, object] = {"before": ex.submit(tasks.square, 2).result(timeout=PATIENCE)}
    ex.shutdown()
    seen["second shutdown"] = outcome(ex.shutdown)
    seen["submit"] = outcome(lambda: ex.submit(tasks.square, 1))
    seen["map"] = outcome(lambda: ex.map(tasks.square, [1]))
    unused = env.make(1)
    unused.shutdown()
    seen["never used, then submit"] = outcome(lambda: unused.submit(tasks.square, 1))
    return seen


@scenario(
    expected={
        "enter returns the executor": True,
        "all done on exit": True,
        "results": [0, 1, 4, 9],
        "submit after": ("raised", "RuntimeError", "cannot schedule new futures after shutdown"),
    }
)
def context_manager_waits_and_shuts_down(env: Env) -> object:
    ex = env.make(2)
    with ex as entered:
        fs = [ex.submit(tasks.sleep_then, i * i, 0.02) for i in range(4)]
    return {
        "enter returns the executor": entered is ex,
        "all done on exit": all(f.done() for f in fs),
        "results": [f.result(timeout=0) for f in fs],
        "submit after": outcome(lambda: ex.submit(tasks.square, 1)),
    }


# ------------------------------------------------------------------------------ argument checks


@scenario(
    expected={
        "max_workers=0": ("raised", "ValueError", "max_workers must be greater than 0"),
        "max_workers=-1": ("raised", "ValueError", "max_workers must be greater than 0"),
        "initializer=5": ("raised", "TypeError", "initializer must be a callable"),
        "max_tasks_per_child=0": ("raised", "ValueError", "max_tasks_per_child must be >= 1"),
        "max_tasks_per_child=1.5": (
            "raised",
            "TypeError",
            "max_tasks_per_child must be an integer",
        ),
    }
)
def constructor_checks_its_arguments(env: Env) -> object:
    return {
        "max_workers=0": outcome(lambda: env.make(0)),
        "max_workers=-1": outcome(lambda: env.make(-1)),
        "initializer=5": outcome(lambda: env.make(1, initializer=5)),
        "max_tasks_per_child=0": outcome(lambda: env.make(1, max_tasks_per_child=0)),
        "max_tasks_per_child=1.5": outcome(lambda: env.make(1, max_tasks_per_child=1.5)),
    }


# ------------------------------------------------------------------------------ initializer


@scenario(
    expected={
        "value seen by every call": ["from initargs"],
        "every process that ran a call ran the initializer once": True,
    }
)
def initializer_runs_once_in_each_worker(env: Env) -> object:
    records = env.tmp / "init-records"
    records.mkdir()
    ex = env.make(2, initializer=tasks.init_worker, initargs=("from initargs", str(records)))
    gate = env.gate()
    # two blocked calls make a second worker necessary, then six more run anywhere
    blocked = [ex.submit(tasks.wait_for_file, gate.path, None) for _ in range(2)]
    seen = [ex.submit(tasks.init_value) for _ in range(6)]
    gate.open()
    cf.wait(blocked, timeout=PATIENCE)
    pairs = [f.result(timeout=PATIENCE) for f in seen]
    ex.shutdown()
    lines = {int(p.name): p.read_text().splitlines() for p in records.iterdir()}
    return {
        "value seen by every call": sorted({v for _, v in pairs}),
        "every process that ran a call ran the initializer once": all(
            lines.get(pid) == ["init"] for pid, _ in pairs
        ),
    }


@scenario(
    expected={
        "the call": "BrokenProcessPool",
        "a later submit": "BrokenProcessPool",
    }
)
def failing_initializer_breaks_the_pool(env: Env) -> object:
    # One worker: with two, distexec leaks the second (see the scenario after this one).
    ex = env.make(1, initializer=tasks.failing_init, initargs=("initializer failed on purpose",))
    f = ex.submit(tasks.square, 3)
    return {
        "the call": broken_or(lambda: f.result(timeout=PATIENCE)),
        "a later submit": broken_or(lambda: ex.submit(tasks.square, 3).result(timeout=PATIENCE)),
    }


@scenario(
    expected={"no process left 5 s after shutdown(wait=True)": True},
)
def failing_initializer_leaves_no_process_behind(env: Env) -> object:
    before = child_processes()
    ex = env.make(2, initializer=tasks.failing_init, initargs=("initializer failed on purpose",))
    f = ex.submit(tasks.square, 3)
    cf.wait([f], timeout=PATIENCE)
    ex.shutdown(wait=True)
    return {
        "no process left 5 s after shutdown(wait=True)": wait_until(
            lambda: not (child_processes() - before), timeout=5
        )
    }


@scenario(
    expected={"distinct processes for 4 calls": 4},
)
def max_tasks_per_child_gives_each_call_a_fresh_process(env: Env) -> object:
    ex = env.make(2, max_tasks_per_child=1)
    pids = list(ex.map(tasks.getpid, range(4)))
    ex.shutdown()
    return {"distinct processes for 4 calls": len(set(pids))}


# ------------------------------------------------------------------------------ waiting


@scenario(
    expected={
        "FIRST_COMPLETED": (["fast"], ["slow"]),
        "FIRST_EXCEPTION": (["failing", "fast"], ["slow"]),
        "timeout": (["failing", "fast"], ["slow"]),
        "as_completed with timeout": (
            ["failing", "fast"],
            ("raised", "TimeoutError", "1 (of 3) futures unfinished"),
        ),
        "as_completed": ["failing", "fast", "slow"],
        "ALL_COMPLETED": (["failing", "fast", "slow"], []),
    }
)
def wait_and_as_completed_work_on_its_futures(env: Env) -> object:
    ex = env.shared
    gate = env.gate()
    slow = ex.submit(*gate.task("slow"))
    fast = ex.submit(tasks.square, 5)
    names = {slow: "slow", fast: "fast"}

    def split(done_not_done: tuple[set[Any], set[Any]]) -> tuple[list[str], list[str]]:
        done, not_done = done_not_done
        return sorted(names[f] for f in done), sorted(names[f] for f in not_done)

    seen: dict[str, object] = {
        "FIRST_COMPLETED": split(
            cf.wait([fast, slow], timeout=PATIENCE, return_when=cf.FIRST_COMPLETED)
        )
    }
    failing = ex.submit(tasks.fail_at, 3)
    names[failing] = "failing"
    seen["FIRST_EXCEPTION"] = split(
        cf.wait([fast, failing, slow], timeout=PATIENCE, return_when=cf.FIRST_EXCEPTION)
    )
    seen["timeout"] = split(cf.wait([fast, failing, slow], timeout=0.05))
    got: list[str] = []

    def drain() -> None:
        for f in cf.as_completed([fast, failing, slow], timeout=0.1):
            got.append(names[f])

    timed_out = outcome(drain)
    seen["as_completed with timeout"] = (sorted(got), timed_out)
    gate.open()
    seen["as_completed"] = sorted(
        names[f] for f in cf.as_completed([fast, failing, slow], timeout=PATIENCE)
    )
    seen["ALL_COMPLETED"] = split(cf.wait([fast, failing, slow], timeout=PATIENCE))
    return seen


# ------------------------------------------------------------------------------ a worker dies


@scenario(expected={"the crashed call": "BrokenProcessPool", "a later submit": "BrokenProcessPool"})
def worker_crash_breaks_the_pool_with_break_on_worker_death(env: Env) -> object:
    # DistributedExecutor's default goes on after a crash (see test_parity's differences);
    # break_on_worker_death=True is CPython's behaviour, so the same program observes the same.
    ex = env.make(2, **env.dx_only(break_on_worker_death=True))
    ex.submit(tasks.square, 2).result(timeout=PATIENCE)
    f = ex.submit(tasks.crash, 1)
    return {
        "the crashed call": broken_or(lambda: f.result(timeout=PATIENCE)),
        "a later submit": broken_or(lambda: ex.submit(tasks.square, 4).result(timeout=PATIENCE)),
    }


@scenario(
    expected={"submit from the crashed call's done callback": "refused: BrokenProcessPool"},
)
def worker_crash_is_known_before_its_future_fails(env: Env) -> object:
    ex = env.make(2, **env.dx_only(break_on_worker_death=True))
    ex.submit(tasks.square, 2).result(timeout=PATIENCE)
    f = ex.submit(tasks.crash, 1)
    seen: list[str] = []
    called = threading.Event()

    def resubmit(_: cf.Future[Any]) -> None:
        try:
            ex.submit(tasks.square, 4)
            seen.append("accepted")
        except BrokenProcessPool:
            seen.append("refused: BrokenProcessPool")
        finally:
            called.set()

    f.add_done_callback(resubmit)
    called.wait(PATIENCE)
    return {"submit from the crashed call's done callback": seen[0] if seen else "not called"}


def run_isolated(env: Env, program: Callable[[Env], object]) -> object:
    """Run *program* and open every gate it made, whatever happens."""
    try:
        return program(env)
    finally:
        env.open_all_gates()


def _check_names() -> None:
    names = [s.name for s in SCENARIOS]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:  # pragma: no cover - a table edit gone wrong
        raise RuntimeError(f"duplicate scenario names: {sorted(dupes)}")


_check_names()

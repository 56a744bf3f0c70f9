"""The tests of CPython's ``test_concurrent_futures`` that ``DistributedExecutor`` is known to fail.

Layer: compat harness data. Imports: nothing.

``EXPECTED_FAILURES`` maps test ids, as ``run_stdlib_suite`` prints them
(``python -m compat.cpython.run_stdlib_suite --list`` lists them all, with the private
attributes each test reads), to why the test fails. The suite builds each test three times, one
class per start method (``ProcessPoolForkExecutorDeadlockTest``,
``ProcessPoolForkserverExecutorDeadlockTest``, ``ProcessPoolSpawnExecutorDeadlockTest``);
``DistributedExecutor`` ignores ``mp_context``, so an entry here names the test once
(``ExecutorDeadlockTest.test_x``) with the variants it fails in, and the keys are generated.

The table is applied strictly: a listed test that passes, is skipped, or no longer exists fails
the run, so entries can only be removed. It applies to ``distexec:DistributedExecutor`` only.
Every entry is either a deliberate difference (the failure stays with the call, the pool goes
on; ``mp_context`` does not make forked workers) or a genuine impossibility (an object that
pickles only through process inheritance).

First filled from the run at commit 3a83956 ("the executor spreads calls over its workers");
private attributes honoured since (``_processes``, ``_mp_context``, ``_executor_manager_thread``,
``_call_queue``, ``_broken``), and all three variants run; workers start on demand unless the
start method is fork, as ``ProcessPoolExecutor``'s do (the ``test_idle_process_reuse`` tests).
"""

VARIANTS = ("Fork", "Forkserver", "Spawn")

_NOT_BROKEN = (
    " where the suite expects BrokenProcessPool: the failure stays with that call and the pool"
    " goes on (DESIGN.md 7)"
)
_INHERITED = (
    " which pickles only while multiprocessing spawns a process (inheritance): distexec pickles"
    " a call in submit() and fails its future there with RuntimeError"
)

# (test as "ClassSuffix.test_name", the variants it fails in, why)
_ENTRIES: list[tuple[str, tuple[str, ...], str]] = [
    # --- a pickling failure is the call's own error, not a broken pool -------------------------
    (
        "ExecutorDeadlockTest.test_error_at_task_unpickle",
        VARIANTS,
        "an UnpicklingError while the worker unpickles the call raises DeserializationError"
        + _NOT_BROKEN,
    ),
    (
        "ExecutorDeadlockTest.test_exit_at_task_unpickle",
        VARIANTS,
        "a SystemExit while the worker unpickles the call raises DeserializationError"
        + _NOT_BROKEN,
    ),
    (
        "ExecutorDeadlockTest.test_error_during_result_unpickle_in_result_handler",
        VARIANTS,
        "an UnpicklingError while the caller unpickles the result raises DeserializationError"
        + _NOT_BROKEN,
    ),
    (
        "ExecutorDeadlockTest.test_exit_during_result_unpickle_in_result_handler",
        VARIANTS,
        "a SystemExit while the caller unpickles the result raises DeserializationError"
        + _NOT_BROKEN,
    ),
    (
        "ExecutorDeadlockTest.test_exit_during_result_pickle_on_worker",
        VARIANTS,
        "a SystemExit while the worker pickles the result fails that call with a PicklingError"
        " (SerializationError) naming it, and the worker lives; ProcessPoolExecutor sends the"
        " SystemExit itself back as the call's exception",
    ),
    # --- a dead worker is replaced, the pool goes on ---------------------------------------------
    (
        "ProcessPoolExecutorTest.test_killed_child",
        VARIANTS,
        "workers start on the manager thread after submit() returns, so _processes is still"
        " empty when the test picks a worker to terminate (StopIteration); and a terminated"
        " worker is replaced rather than breaking the pool, so the later submit() the test"
        " expects to raise BrokenProcessPool would succeed (DESIGN.md 7)",
    ),
    # --- objects that pickle only through process inheritance ------------------------------------
    (
        "FailingInitializerTest.test_initializer",
        VARIANTS,
        "initargs hold a multiprocessing Queue,"
        + _INHERITED.replace(" a call in submit()", "")
        + "; here the initializer cannot be sent, so its ValueError never reaches the log queue"
        " the test reads",
    ),
    (
        "ProcessPoolExecutorTest.test_saturation",
        VARIANTS,
        "its 75 calls carry a multiprocessing Semaphore," + _INHERITED + ", so no call ever needs"
        " a worker and none is started; the test counts ProcessPoolExecutor's processes, which"
        " it starts in submit() before its feeder thread fails to pickle the calls",
    ),
    (
        "ProcessPoolShutdownTest.test_processes_terminate",
        VARIANTS,
        "its 3 calls carry a multiprocessing Semaphore," + _INHERITED + ", so no worker is"
        " started; the test counts ProcessPoolExecutor's processes (3, or 5 with fork), which it"
        " starts in submit() before its feeder thread fails to pickle the calls",
    ),
    # --- mp_context does not make forked workers -------------------------------------------------
    (
        "ProcessPoolExecutorTest.test_max_tasks_per_child",
        ("Fork",),
        "with a fork context the test expects ValueError for max_tasks_per_child; distexec's"
        " workers are fresh interpreters whatever the context, so max_tasks_per_child works",
    ),
]


def _expand(entries: list[tuple[str, tuple[str, ...], str]]) -> dict[str, str]:
    table: dict[str, str] = {}
    for test, variants, reason in entries:
        unknown = set(variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"{test}: unknown variants {sorted(unknown)}")
        for variant in variants:
            key = f"ProcessPool{variant}{test}"
            if key in table:
                raise ValueError(f"{key} is listed twice")
            table[key] = reason
    return table


EXPECTED_FAILURES: dict[str, str] = _expand(_ENTRIES)

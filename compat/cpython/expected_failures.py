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
on; ``mp_context`` does not make forked workers) or a genuine impossibility (a semaphore made
for fork, which only a forked child can share).

First filled from the run at commit 3a83956 ("the executor spreads calls over its workers");
private attributes honoured since (``_processes``, ``_mp_context``, ``_executor_manager_thread``,
``_call_queue``, ``_broken``), and all three variants run; workers start on demand unless the
start method is fork, as ``ProcessPoolExecutor``'s do (the ``test_idle_process_reuse`` tests).
Since then multiprocessing's locks, semaphores and conditions travel by the name of their
semaphores, and its pipes and queues by passing their descriptors (``test_saturation``,
``test_processes_terminate``, and ``test_initializer`` with its log queue); reading
``_processes`` waits for the workers being started, which ``ProcessPoolExecutor`` starts inside
``submit()``.
"""

VARIANTS = ("Fork", "Forkserver", "Spawn")

_NOT_BROKEN = (
    " where the suite expects BrokenProcessPool: the failure stays with that call and the pool"
    " goes on (DESIGN.md 7)"
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
        "a terminated worker is replaced rather than breaking the pool: the call that was"
        " running there fails with WorkerLostError, and the later call the test expects to"
        " raise BrokenProcessPool runs on the replacement (DESIGN.md 7)",
    ),
    # --- objects that pickle only through process inheritance ------------------------------------
    (
        "FailingInitializerTest.test_initializer",
        ("Fork",),
        "initargs hold a multiprocessing Queue made for the fork start method: its locks are"
        " semaphores whose names are unlinked at once, which only forked children can share."
        " distexec refuses to send it (SerializationError), so the initializer's ValueError"
        " never reaches the log queue the test reads",
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

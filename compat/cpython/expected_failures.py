"""The tests of CPython's ``test_concurrent_futures`` that ``DistributedExecutor`` is known to fail.

Layer: compat harness data. Imports: nothing.

Keys are ``Class.test_name`` ids of the ``spawn`` variant, as ``run_stdlib_suite`` prints them
(``python -m compat.cpython.run_stdlib_suite --list`` lists them all, with the private
attributes each test reads); values say why the test fails. The table is applied strictly: a
listed test that passes, is skipped, or no longer exists fails the run, so entries can only be
removed. It applies to ``distexec:DistributedExecutor`` only.

First filled from the run at commit 3a83956 ("the executor spreads calls over its workers").
"""

_PRIVATE = "reads ProcessPoolExecutor's private "
_NOT_BROKEN = (
    " where the suite expects BrokenProcessPool: the failure stays with that call and the pool"
    " goes on (DESIGN.md 7)"
)

EXPECTED_FAILURES: dict[str, str] = {
    # --- the test reads private attributes of ProcessPoolExecutor ------------------------------
    "ProcessPoolSpawnExecutorDeadlockTest.test_shutdown_deadlock_pickle": (
        _PRIVATE + "_executor_manager_thread"
    ),
    "ProcessPoolSpawnProcessPoolExecutorTest.test_idle_process_reuse_multiple": (
        _PRIVATE + "_processes"
    ),
    "ProcessPoolSpawnProcessPoolExecutorTest.test_idle_process_reuse_one": _PRIVATE + "_processes",
    "ProcessPoolSpawnProcessPoolExecutorTest.test_killed_child": (
        _PRIVATE + "_processes (to pick a worker to kill)"
    ),
    "ProcessPoolSpawnProcessPoolExecutorTest.test_max_tasks_per_child": _PRIVATE + "_processes",
    "ProcessPoolSpawnProcessPoolExecutorTest.test_max_tasks_per_child_defaults_to_spawn_context": (
        _PRIVATE + "_mp_context"
    ),
    "ProcessPoolSpawnProcessPoolExecutorTest.test_saturation": _PRIVATE + "_processes",
    "ProcessPoolSpawnProcessPoolShutdownTest.test_context_manager_shutdown": (
        _PRIVATE + "_processes"
    ),
    "ProcessPoolSpawnProcessPoolShutdownTest.test_del_shutdown": (
        _PRIVATE + "_processes, _call_queue, _executor_manager_thread"
    ),
    "ProcessPoolSpawnProcessPoolShutdownTest.test_processes_terminate": _PRIVATE + "_processes",
    "ProcessPoolSpawnProcessPoolShutdownTest.test_shutdown_no_wait": (
        _PRIVATE + "_processes, _call_queue, _executor_manager_thread"
    ),
    # --- a pickling failure is the call's own error, not a broken pool -------------------------
    "ProcessPoolSpawnExecutorDeadlockTest.test_error_at_task_unpickle": (
        "an UnpicklingError while the worker unpickles the call raises DeserializationError"
        + _NOT_BROKEN
    ),
    "ProcessPoolSpawnExecutorDeadlockTest.test_exit_at_task_unpickle": (
        "a SystemExit while the worker unpickles the call raises DeserializationError" + _NOT_BROKEN
    ),
    "ProcessPoolSpawnExecutorDeadlockTest.test_error_during_result_unpickle_in_result_handler": (
        "an UnpicklingError while the caller unpickles the result raises DeserializationError"
        + _NOT_BROKEN
    ),
    "ProcessPoolSpawnExecutorDeadlockTest.test_exit_during_result_unpickle_in_result_handler": (
        "a SystemExit while the caller unpickles the result raises DeserializationError"
        + _NOT_BROKEN
    ),
    "ProcessPoolSpawnExecutorDeadlockTest.test_exit_during_result_pickle_on_worker": (
        "a SystemExit while the worker pickles the result fails that call with a PicklingError"
        " (SerializationError) naming it, and the worker lives; ProcessPoolExecutor sends the"
        " SystemExit itself back as the call's exception"
    ),
    # --- other behaviour ----------------------------------------------------------------------
    "ProcessPoolSpawnFailingInitializerTest.test_initializer": (
        "initargs hold a multiprocessing Queue, which pickles only through inheritance: the"
        " initializer never runs on the worker, so its ValueError never reaches the log queue"
        " (the test then reads the private _broken)"
    ),
    "ProcessPoolSpawnProcessPoolExecutorTest.test_ressources_gced_in_workers": (
        "a multiprocessing Manager proxy in the arguments does not unpickle on a distexec worker:"
        " AuthenticationError, the worker does not have the caller's multiprocessing authkey"
    ),
}

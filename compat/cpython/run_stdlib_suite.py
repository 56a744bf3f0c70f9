"""Run CPython's ``test_concurrent_futures`` with an executor in ``ProcessPoolExecutor``'s place.

Layer: compat harness, never shipped. Imports: stdlib, compat.cpython (and, to check that it
loads, the executor under test).

Usage, from the repository root::

    python -m compat.cpython.run_stdlib_suite                      # distexec:DistributedExecutor
    python -m compat.cpython.run_stdlib_suite --executor concurrent.futures:ProcessPoolExecutor \\
        --start-methods all
    python -m compat.cpython.run_stdlib_suite --executor compat.cpython.adapters:LokyExecutor \\
        --start-methods all
    python -m compat.cpython.run_stdlib_suite -k Deadlock --log-dir /tmp/cf-logs

The suite is the copy in Debian's ``libpython3.11-testsuite`` (``/usr/lib/python3.11/test``),
never copied into this repository. How it is run:

* A scratch folder holding only a symlink ``test -> /usr/lib/python3.11/test`` goes first on
  the children's ``PYTHONPATH``; putting ``/usr/lib/python3.11`` itself there would shadow the
  interpreter's own ``concurrent.futures`` with Debian's.
* ``site_hook/sitecustomize.py`` (also on ``PYTHONPATH``) makes
  ``concurrent.futures.ProcessPoolExecutor`` and ``concurrent.futures.<Executor.__name__>``
  the executor under test in every interpreter of a test's process tree. The suite's
  ``ProcessPool{Fork,Forkserver,Spawn}Mixin`` read ``futures.ProcessPoolExecutor`` when their
  class bodies run, so their ``executor_type`` is the substitute, and so is every direct
  ``futures.ProcessPoolExecutor(...)`` call in the tests. The tests that start a child
  interpreter with ``from concurrent.futures import {executor_type.__name__}`` get it there too:
  the child runner lets ``assert_python_ok`` pass the environment on (no ``-I``).
* Only the process-pool variants run (classes whose mixin has a start method ``ctx``), by
  default all three (fork, forkserver, spawn), as CPython does: ``DistributedExecutor`` ignores
  ``mp_context``, but the tests are the suite's and count. ``--start-methods spawn`` runs one.
* Each test runs in its own child process and process group (``python -m
  compat.cpython._child run ID``), ``--jobs`` at a time (2: the machines have 2 cores), with a
  per-test ``--timeout``. A child past it gets SIGUSR1 (faulthandler dumps its threads into
  the log), then its whole process group gets SIGKILL, and the test counts as a timeout.
* An unlisted test that fails (short of a timeout) alongside another is run once more, alone,
  and that outcome counts; a pass alone stays visible as a note. Not when more than
  ``MAX_RERUNS`` failed; ``--no-rerun`` turns it off.
* ``expected_failures.py`` (id -> reason) is applied strictly: a listed test that passes, is
  skipped, or does not exist is as much a failure as an unlisted test that fails.
* Totals are reported twice, over all variants and then per variant: all tests, and the tests
  whose source does not read a private attribute of ``ProcessPoolExecutor`` (``_processes``,
  ``_executor_manager_thread``, ...), which a drop-in cannot be expected to have
  (``DistributedExecutor`` has most of them, with their meaning).

Exit status: 0 when every outcome is as expected, 1 when some are not, 2 when the harness could
not run (suite missing, executor missing, discovery failed).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

from compat.cpython._child import DUMP_SIGNAL, EXECUTOR_ENV, EXECUTOR_NAME_ENV, resolve

DEFAULT_EXECUTOR = "distexec:DistributedExecutor"
DEFAULT_TABLE = "compat.cpython.expected_failures:EXPECTED_FAILURES"
DEFAULT_STDLIB_TEST_DIR = Path(f"/usr/lib/python{sys.version_info[0]}.{sys.version_info[1]}/test")
SUITE_FILE = "test_concurrent_futures.py"
START_METHODS = ("fork", "forkserver", "spawn")
REPO = Path(__file__).resolve().parents[2]
SITE_HOOK = Path(__file__).resolve().parent / "site_hook"
# How long a finished test's leftover processes get to exit before they count as left behind.
LEFTOVER_GRACE = 5.0
# How long a timed-out child gets to dump its threads before its process group is killed.
DUMP_GRACE = 2.0
LOG_TAIL_LINES = 40
# More unexpected failures than this are not flakes, and are not run again.
MAX_RERUNS = 10


class HarnessError(Exception):
    """The suite could not be run at all; the message says why and what to do."""


class Outcome(StrEnum):
    """What happened to one test, as the child (or the parent's clock) saw it."""

    PASSED = "passed"
    SKIPPED = "skipped"
    FAILED = "failed"
    ERROR = "error"
    TIMEOUT = "timeout"
    CRASHED = "crashed"  # the child died without recording an outcome

    @property
    def failing(self) -> bool:
        """True for every outcome but passed and skipped."""
        return self not in (Outcome.PASSED, Outcome.SKIPPED)


class Verdict(StrEnum):
    """An outcome held against the expected-failures table."""

    PASSED = "passed"  # not listed, passed
    SKIPPED = "skipped"  # not listed, skipped by the suite itself
    XFAILED = "xfailed"  # listed, and failed
    FAILED = "FAILED"  # not listed, and failed
    XPASSED = "XPASSED"  # listed, but passed
    LISTED_SKIPPED = "LISTED-SKIPPED"  # listed, but skipped
    STALE = "STALE"  # listed, but the suite has no such test

    @property
    def unexpected(self) -> bool:
        """True for the verdicts that make the run fail."""
        return self in (Verdict.FAILED, Verdict.XPASSED, Verdict.LISTED_SKIPPED, Verdict.STALE)


@dataclass(frozen=True, slots=True)
class SuiteTest:
    """One test of the suite: ``Class.test_name``, its start method, the private names it reads."""

    id: str
    start_method: str
    private_attrs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One test's run: outcome, detail (exception line, skip reason), time, log, notes."""

    test: SuiteTest
    outcome: Outcome
    detail: str
    seconds: float
    log: Path
    notes: tuple[str, ...] = ()
    env_changed: bool = False  # test.support saw dangling threads or processes afterwards
    rerun: bool = False  # this is the second run, alone, of a test that failed alongside others


@dataclass(frozen=True, slots=True)
class Judgement:
    """One line of the verdict: the test id, the verdict and what it means."""

    test_id: str
    verdict: Verdict
    message: str


def judge(
    records: Iterable[RunRecord], table: Mapping[str, str], known_ids: Iterable[str]
) -> list[Judgement]:
    """Hold each record against *table*; a table entry outside *known_ids* is stale.

    Entries for known tests that did not run in this selection are not judged.
    """
    judgements: list[Judgement] = []
    for record in records:
        test_id, outcome = record.test.id, record.outcome
        reason = table.get(test_id)
        if reason is None:
            if outcome.failing:
                judgements.append(Judgement(test_id, Verdict.FAILED, f"{outcome}: {record.detail}"))
            elif outcome is Outcome.SKIPPED:
                judgements.append(Judgement(test_id, Verdict.SKIPPED, record.detail))
            else:
                judgements.append(Judgement(test_id, Verdict.PASSED, ""))
        elif outcome.failing:
            judgements.append(Judgement(test_id, Verdict.XFAILED, f"{outcome}: {reason}"))
        elif outcome is Outcome.SKIPPED:
            message = f"listed but skipped ({record.detail}): remove it from the table"
            judgements.append(Judgement(test_id, Verdict.LISTED_SKIPPED, message))
        else:
            message = "unexpected pass: remove it from the table"
            judgements.append(Judgement(test_id, Verdict.XPASSED, message))
    known = set(known_ids)
    for test_id in sorted(set(table) - known):
        judgements.append(Judgement(test_id, Verdict.STALE, "no such test in the suite"))
    return judgements


def totals_line(records: Sequence[RunRecord]) -> str:
    """``N tests: P passed, F failed, S skipped``; failed counts errors, timeouts and crashes."""
    counts = Counter(record.outcome for record in records)
    failed = sum(n for outcome, n in counts.items() if outcome.failing)
    line = f"{len(records)} tests: {counts[Outcome.PASSED]} passed, {failed} failed"
    line += f", {counts[Outcome.SKIPPED]} skipped"
    kinds = [f"{counts[o]} {o}" for o in Outcome if o.failing and o is not Outcome.FAILED]
    kinds = [kind for kind in kinds if not kind.startswith("0 ")]
    return line + (f" (of the failed: {', '.join(kinds)})" if kinds else "")


def verdict_line(judgements: Sequence[Judgement]) -> str:
    """The closing line: passed, unexpected (failed), skipped, expected failures (xfailed)."""
    counts = Counter(j.verdict for j in judgements)
    failed = sum(n for verdict, n in counts.items() if verdict.unexpected)
    return (
        f"stdlib-suite: {counts[Verdict.PASSED]} passed, {failed} failed, "
        f"{counts[Verdict.SKIPPED]} skipped, {counts[Verdict.XFAILED]} xfailed"
    )


# --- setting up -------------------------------------------------------------------------------


def load_executor(spec: str) -> type:
    """Import the executor class named by *spec*, or raise HarnessError saying what is missing."""
    try:
        executor = resolve(spec)
    except Exception as exc:
        hint = ""
        if spec == DEFAULT_EXECUTOR:
            hint = (
                "\ndistexec.DistributedExecutor does not exist yet or does not import; this"
                " harness cannot pass until it does."
            )
        raise HarnessError(
            f"cannot load the executor {spec!r}: {type(exc).__name__}: {exc}{hint}"
        ) from exc
    if not (isinstance(executor, type) and issubclass(executor, concurrent.futures.Executor)):
        raise HarnessError(f"{spec!r} is {executor!r}, not a concurrent.futures.Executor class")
    return executor


def load_table(spec: str | None) -> dict[str, str]:
    """The expected-failures table named by *spec* (``module:name``), or {} for None."""
    if spec is None:
        return {}
    try:
        table = resolve(spec)
    except Exception as exc:
        raise HarnessError(f"cannot load the expected-failures table {spec!r}: {exc}") from exc
    if not isinstance(table, dict):
        raise HarnessError(f"{spec!r} is a {type(table).__name__}, not a dict")
    return {str(key): str(value) for key, value in table.items()}


def make_scratch(root: Path, stdlib_test_dir: Path) -> dict[str, Path]:
    """Lay out the scratch folders under *root*: the ``test`` symlink, cwd, pycache, logs."""
    folders = {name: root / name for name in ("stdlib", "cwd", "pycache", "logs")}
    for folder in folders.values():
        folder.mkdir()
    (folders["stdlib"] / "test").symlink_to(stdlib_test_dir, target_is_directory=True)
    return folders


def child_env(stdlib: Path, pycache: Path, spec: str, executor: type) -> dict[str, str]:
    """The environment of every child: the ``test`` symlink, the hook, the repository."""
    env = dict(os.environ)
    path = [str(stdlib), str(SITE_HOOK), str(REPO)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    # Bytecode goes to scratch: nothing is written into /usr/lib or into the repository.
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env[EXECUTOR_ENV] = spec
    env[EXECUTOR_NAME_ENV] = executor.__name__
    return env


def discover(env: Mapping[str, str], cwd: Path, out: Path) -> list[SuiteTest]:
    """Ask a child for every process-pool test of the suite (all start methods)."""
    command = [sys.executable, "-m", "compat.cpython._child", "discover", str(out)]
    proc = subprocess.run(
        command,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0 or not out.exists():
        raise HarnessError(
            f"discovery failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}".rstrip()
        )
    tests = json.loads(out.read_text())["tests"]
    return [SuiteTest(t["id"], t["start_method"], tuple(t["private_attrs"])) for t in tests]


# --- running ----------------------------------------------------------------------------------


class _Groups:
    """The process groups of the children now running, to kill them all on interrupt."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards: _pgids
        self._pgids: set[int] = set()

    def add(self, pgid: int) -> None:
        with self._lock:
            self._pgids.add(pgid)

    def discard(self, pgid: int) -> None:
        with self._lock:
            self._pgids.discard(pgid)

    def kill_all(self) -> None:
        with self._lock:
            pgids = list(self._pgids)
        for pgid in pgids:
            _kill_group(pgid)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group *pgid*, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ")".
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _reap_leftovers(pgid: int) -> str | None:
    """Give the group's leftovers LEFTOVER_GRACE to exit, then kill them; describe any."""
    deadline = time.monotonic() + LEFTOVER_GRACE
    while members := _group_members(pgid):
        if time.monotonic() > deadline:
            _kill_group(pgid)
            return f"left {len(members)} process(es) running after it exited (killed)"
        time.sleep(0.05)
    return None


def run_one(
    test: SuiteTest, env: Mapping[str, str], cwd: Path, logs: Path, timeout: float, groups: _Groups
) -> RunRecord:
    """Run *test* in a child process of its own and record what happened."""
    log, result = logs / f"{test.id}.log", logs / f"{test.id}.json"
    command = [
        sys.executable,
        "-X",
        "faulthandler",
        "-m",
        "compat.cpython._child",
        "run",
        test.id,
        str(result),
    ]
    start = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        groups.add(proc.pid)
        try:
            proc.wait(timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(DUMP_SIGNAL)
            try:
                proc.wait(DUMP_GRACE)
            except subprocess.TimeoutExpired:
                pass
            _kill_group(proc.pid)
            proc.wait()
        seconds = time.monotonic() - start
        notes = []
        if leftover := _reap_leftovers(proc.pid):
            notes.append(leftover)
        groups.discard(proc.pid)
    recorded = json.loads(result.read_text()) if result.exists() else None
    env_changed = bool(recorded and recorded["env_changed"])
    if timed_out:
        outcome = Outcome.TIMEOUT
        if recorded:
            detail = f"the test {recorded['outcome']}, then the interpreter did not exit"
        else:
            detail = f"still running after {timeout:g} s"
    elif recorded is None:
        outcome = Outcome.CRASHED
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        detail = f"child died ({how})"
    else:
        outcome, detail = Outcome(recorded["outcome"]), recorded["detail"]
    return RunRecord(test, outcome, detail, seconds, log, tuple(notes), env_changed)


def run_all(
    tests: Sequence[SuiteTest],
    env: Mapping[str, str],
    cwd: Path,
    logs: Path,
    timeout: float,
    jobs: int,
) -> list[RunRecord]:
    """Run *tests*, *jobs* at a time, printing one line per finished test."""
    groups = _Groups()
    records: list[RunRecord] = []
    width = len(str(len(tests)))
    with concurrent.futures.ThreadPoolExecutor(jobs, thread_name_prefix="stdlib-suite") as pool:
        futures = [pool.submit(run_one, t, env, cwd, logs, timeout, groups) for t in tests]
        try:
            for future in concurrent.futures.as_completed(futures):
                record = future.result()
                records.append(record)
                print(
                    f"[{len(records):{width}}/{len(tests)}] {record.outcome:8} "
                    f"{record.seconds:5.1f}s {record.test.id}",
                    flush=True,
                )
        except BaseException:
            for future in futures:
                future.cancel()
            groups.kill_all()
            raise
    order = {t.id: i for i, t in enumerate(tests)}
    return sorted(records, key=lambda r: order[r.test.id])


def rerun_unexpected_failures(
    records: Sequence[RunRecord],
    table: Mapping[str, str],
    env: Mapping[str, str],
    cwd: Path,
    logs: Path,
    timeout: float,
) -> list[RunRecord]:
    """Run the unlisted tests that failed once more, alone; their second outcome counts.

    Some of the suite's tests allow a few seconds for work that includes starting workers,
    which two tests at a time on two cores can exceed (loky's spawn variant of
    ``test_map_timeout`` does, now and then). A test that passes alone keeps its first failure
    in its notes, so the flake stays visible. Timeouts are not run again (their window is not
    seconds), and neither is anything when more than MAX_RERUNS tests failed.
    """
    failed = [
        r
        for r in records
        if r.outcome.failing and r.outcome is not Outcome.TIMEOUT and r.test.id not in table
    ]
    if not failed:
        return list(records)
    if len(failed) > MAX_RERUNS:
        print(f"\n{len(failed)} unexpected failures: too many to be flakes, not run again")
        return list(records)
    print(f"\nrunning the {len(failed)} unexpected failure(s) again, one at a time:", flush=True)
    (logs / "rerun").mkdir(exist_ok=True)
    again = run_all([r.test for r in failed], env, cwd, logs / "rerun", timeout, jobs=1)
    first = {r.test.id: r for r in failed}
    replaced = {}
    for record in again:
        notes = record.notes
        if not record.outcome.failing:
            before = first[record.test.id]
            flake = f"{before.outcome} alongside others ({before.detail}), {record.outcome} alone"
            notes = (flake, *before.notes, *notes)
        replaced[record.test.id] = replace(record, notes=notes, rerun=True)
    return [replaced.get(r.test.id, r) for r in records]


# --- reporting --------------------------------------------------------------------------------


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    | " + line for line in text.rstrip().splitlines()[-lines:])


def report(records: Sequence[RunRecord], judgements: Sequence[Judgement]) -> str:
    """The summary printed after the run."""
    by_id = {record.test.id: record for record in records}
    out: list[str] = []
    unexpected = [j for j in judgements if j.verdict.unexpected]
    if unexpected:
        out.append(f"\nunexpected outcomes ({len(unexpected)}):")
        for j in unexpected:
            out.append(f"  {j.verdict:14} {j.test_id}: {j.message}")
            if j.verdict is Verdict.FAILED:
                out.append(_tail(by_id[j.test_id].log))
    expected = [j for j in judgements if j.verdict is Verdict.XFAILED]
    if expected:
        out.append(f"\nexpected failures ({len(expected)}):")
        out.extend(f"  {j.test_id}: {j.message}" for j in expected)
    noted = [r for r in records if r.notes]
    if noted:
        out.append(f"\nnotes ({len(noted)}):")
        out.extend(f"  {r.test.id}: {'; '.join(r.notes)}" for r in noted)
    if altered := sum(r.env_changed for r in records):
        out.append(
            f"\ntest.support found dangling threads or processes after {altered} of"
            f' {len(records)} tests ("Warning -- Dangling thread" in their logs)'
        )
    rerun = [r for r in records if r.rerun]
    if rerun:
        passed = sum(not r.outcome.failing for r in rerun)
        out.append(
            f"\nrun again alone after failing alongside others: {len(rerun)};"
            f" {passed} passed or skipped then, and count as such (see the notes)"
        )
    out.append("\ntotals (failed = failed + error + timeout + crashed):")
    out.extend(_totals_block(records, ""))
    methods = [m for m in START_METHODS if any(r.test.start_method == m for r in records)]
    if len(methods) > 1:
        for method in methods:
            variant = [r for r in records if r.test.start_method == method]
            out.extend(_totals_block(variant, f"{method} variant, "))
    private = [r for r in records if r.test.private_attrs]
    reads = Counter(name for r in private for name in r.test.private_attrs)
    if reads:
        out.append(
            "  (private reads: "
            + ", ".join(f"{name} in {n}" for name, n in reads.most_common())
            + ")"
        )
    return "\n".join(out)


def _totals_block(records: Sequence[RunRecord], label: str) -> list[str]:
    """Three totals lines: all tests, those reading no private attribute, the others."""
    public = [r for r in records if not r.test.private_attrs]
    private = [r for r in records if r.test.private_attrs]
    rows = [
        ("all tests:", records),
        ("not reading private attributes:", public),
        ("reading private attributes:", private),
    ]
    width = len(label) + 33
    return [f"  {(label + title).ljust(width)} {totals_line(rs)}" for title, rs in rows]


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m compat.cpython.run_stdlib_suite",
        description="Run CPython's test_concurrent_futures against a substituted executor.",
    )
    parser.add_argument(
        "--executor",
        default=DEFAULT_EXECUTOR,
        metavar="MODULE:CLASS",
        help=f"the executor put in ProcessPoolExecutor's place (default: {DEFAULT_EXECUTOR})",
    )
    parser.add_argument(
        "--expected-failures",
        metavar="MODULE:NAME|none",
        help=f"the {{test id: reason}} table (default: {DEFAULT_TABLE} for the default executor,"
        " none for any other)",
    )
    parser.add_argument(
        "--start-methods",
        default="all",
        metavar="LIST|all",
        help="comma-separated variants to run, of fork, forkserver, spawn (default: all)",
    )
    parser.add_argument(
        "-k",
        dest="patterns",
        action="append",
        default=[],
        metavar="SUBSTRING",
        help="run only tests whose id contains SUBSTRING (repeatable)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per test (60)")
    parser.add_argument("--jobs", type=int, default=2, help="tests at a time (2)")
    parser.add_argument(
        "--stdlib-test-dir",
        type=Path,
        default=DEFAULT_STDLIB_TEST_DIR,
        help=f"where the stdlib test package is (default: {DEFAULT_STDLIB_TEST_DIR})",
    )
    parser.add_argument(
        "--no-rerun",
        dest="rerun",
        action="store_false",
        help="do not run unexpected failures again, alone, before judging them",
    )
    parser.add_argument("--log-dir", type=Path, help="keep each test's log here")
    parser.add_argument("--list", action="store_true", help="list the selected tests and stop")
    args = parser.parse_args(argv)
    methods = START_METHODS if args.start_methods == "all" else args.start_methods.split(",")
    if unknown := set(methods) - set(START_METHODS):
        parser.error(f"unknown start methods: {', '.join(sorted(unknown))}")
    args.start_methods = tuple(m for m in START_METHODS if m in methods)
    if args.expected_failures is None:
        args.expected_failures = DEFAULT_TABLE if args.executor == DEFAULT_EXECUTOR else "none"
    if args.expected_failures == "none":
        args.expected_failures = None
    return args


def _run(args: argparse.Namespace, scratch: Path) -> int:
    suite_file = args.stdlib_test_dir / SUITE_FILE
    if not suite_file.is_file():
        raise HarnessError(
            f"{suite_file} is missing: install Debian's libpython3.11-testsuite"
            " (apt-get install libpython3.11-testsuite)"
        )
    executor = load_executor(args.executor)
    table = load_table(args.expected_failures)
    folders = make_scratch(scratch, args.stdlib_test_dir.resolve())
    logs = args.log_dir or folders["logs"]
    logs.mkdir(parents=True, exist_ok=True)
    env = child_env(folders["stdlib"], folders["pycache"], args.executor, executor)

    started = time.monotonic()
    every = discover(env, folders["cwd"], scratch / "discovered.json")
    selected = [
        t
        for t in every
        if t.start_method in args.start_methods
        and (not args.patterns or any(p in t.id for p in args.patterns))
    ]
    print(
        f"CPython test_concurrent_futures ({suite_file}) against {args.executor}\n"
        f"python {platform.python_version()} ({sys.executable}); start methods:"
        f" {','.join(args.start_methods)}; {len(selected)} of {len(every)} process-pool tests;"
        f" {args.jobs} at a time, {args.timeout:g} s each; expected failures:"
        f" {args.expected_failures or 'none'} ({len(table)})",
        flush=True,
    )
    if args.list:
        for t in selected:
            print(f"  {t.id}" + (f"  [{', '.join(t.private_attrs)}]" if t.private_attrs else ""))
        return 0
    if not selected:
        raise HarnessError("no test selected")
    records = run_all(selected, env, folders["cwd"], logs, args.timeout, args.jobs)
    if args.rerun:
        records = rerun_unexpected_failures(records, table, env, folders["cwd"], logs, args.timeout)
    judgements = judge(records, table, (t.id for t in every))
    print(report(records, judgements))
    print(f"wall time: {time.monotonic() - started:.1f} s")
    if args.log_dir:
        print(f"logs: {args.log_dir}")
    print(verdict_line(judgements))
    return 1 if any(j.verdict.unexpected for j in judgements) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse *argv*, run the selected tests, print the summary; return the exit status."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with tempfile.TemporaryDirectory(prefix="compat-cpython-") as scratch:
            return _run(args, Path(scratch))
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("stdlib-suite: the harness could not run the suite", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

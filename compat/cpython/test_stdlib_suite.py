"""pytest entry of the CPython suite harness: the whole run, and its verdict logic on its own.

Layer: compat harness tests. Imports: stdlib, pytest, compat.cpython.

``test_cpython_suite_against_distributed_executor`` runs
``python -m compat.cpython.run_stdlib_suite`` (``DistributedExecutor``, the fork, forkserver and
spawn variants, strict ``expected_failures.py``) and passes when it exits 0. It prints the
totals over all three variants twice, all tests and those that read no private attribute of
``ProcessPoolExecutor``, then each variant's. It skips only on a developer's machine
without Debian's ``libpython3.11-testsuite``; under ``CI`` a missing suite is a failure, since
``.ci/run`` installs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from compat.cpython import _child
from compat.cpython.run_stdlib_suite import (
    DEFAULT_STDLIB_TEST_DIR,
    REPO,
    SITE_HOOK,
    SUITE_FILE,
    Judgement,
    Outcome,
    RunRecord,
    SuiteTest,
    Verdict,
    judge,
    totals_line,
    verdict_line,
)

# Worst case: 177 tests, 2 at a time, each killed at its 60 s timeout (timeouts are not rerun).
SUITE_TIMEOUT = 177 * 60 // 2 + 300


@pytest.mark.timeout(SUITE_TIMEOUT + 60)
def test_cpython_suite_against_distributed_executor(
    record_property: Callable[[str, object], None],
) -> None:
    suite = DEFAULT_STDLIB_TEST_DIR / SUITE_FILE
    if not suite.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{suite} is missing in CI: .ci/run must install libpython3.11-testsuite")
        pytest.skip(f"{suite} is not installed (apt-get install libpython3.11-testsuite)")
    proc = subprocess.run(
        [sys.executable, "-m", "compat.cpython.run_stdlib_suite"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SUITE_TIMEOUT,
        check=False,
    )
    print(proc.stdout)
    print(proc.stderr, file=sys.stderr)
    totals = [
        line.strip()
        for line in proc.stdout.splitlines()
        if " tests: " in line or line.startswith("stdlib-suite:")
    ]
    record_property("compat_totals", totals)  # printed in the run's summary (compat/conftest.py)
    for heading in ("all tests:", "not reading private attributes:"):
        assert any(line.startswith(heading) for line in totals), f"no {heading!r} total"
    assert proc.returncode == 0, "\n".join([*totals, *proc.stderr.splitlines()[-5:]])


# --- the verdict logic, without running anything ----------------------------------------------


def _record(test_id: str, outcome: Outcome, private: tuple[str, ...] = ()) -> RunRecord:
    return RunRecord(SuiteTest(test_id, "spawn", private), outcome, "detail", 1.0, Path("x.log"))


judge_cases = [
    # (outcome, listed, verdict)
    (Outcome.PASSED, False, Verdict.PASSED),
    (Outcome.SKIPPED, False, Verdict.SKIPPED),
    (Outcome.FAILED, False, Verdict.FAILED),
    (Outcome.ERROR, False, Verdict.FAILED),
    (Outcome.TIMEOUT, False, Verdict.FAILED),
    (Outcome.CRASHED, False, Verdict.FAILED),
    (Outcome.FAILED, True, Verdict.XFAILED),
    (Outcome.TIMEOUT, True, Verdict.XFAILED),
    (Outcome.PASSED, True, Verdict.XPASSED),
    (Outcome.SKIPPED, True, Verdict.LISTED_SKIPPED),
]


@pytest.mark.parametrize(("outcome", "listed", "verdict"), judge_cases)
def test_judge_applies_the_table_strictly(outcome: Outcome, listed: bool, verdict: Verdict) -> None:
    table = {"A.test_a": "known"} if listed else {}
    [judgement] = judge([_record("A.test_a", outcome)], table, ["A.test_a"])
    assert judgement.verdict is verdict
    assert judgement.verdict.unexpected == (verdict in _UNEXPECTED)


_UNEXPECTED = {Verdict.FAILED, Verdict.XPASSED, Verdict.LISTED_SKIPPED, Verdict.STALE}


def test_judge_reports_stale_entries_but_not_unselected_ones() -> None:
    table = {"A.test_gone": "renamed upstream", "A.test_not_selected": "known"}
    judgements = judge([], table, ["A.test_not_selected"])
    assert judgements == [Judgement("A.test_gone", Verdict.STALE, "no such test in the suite")]


def test_unexpected_pass_says_to_remove_the_entry() -> None:
    [judgement] = judge([_record("A.test_a", Outcome.PASSED)], {"A.test_a": "r"}, ["A.test_a"])
    assert "unexpected pass: remove it from the table" in judgement.message


def test_totals_and_closing_line() -> None:
    records = [
        _record("A.test_a", Outcome.PASSED),
        _record("A.test_b", Outcome.TIMEOUT, ("_processes",)),
        _record("A.test_c", Outcome.SKIPPED),
        _record("A.test_d", Outcome.FAILED),
    ]
    assert (
        totals_line(records) == "4 tests: 1 passed, 2 failed, 1 skipped (of the failed: 1 timeout)"
    )
    judgements = judge(records, {"A.test_d": "known"}, [r.test.id for r in records])
    assert verdict_line(judgements) == "stdlib-suite: 1 passed, 1 failed, 1 skipped, 1 xfailed"


def test_hook_and_child_agree_on_the_environment_names() -> None:
    source = (SITE_HOOK / "sitecustomize.py").read_text()
    assert f'EXECUTOR_ENV = "{_child.EXECUTOR_ENV}"' in source
    assert f'EXECUTOR_NAME_ENV = "{_child.EXECUTOR_NAME_ENV}"' in source


def test_private_reads_sees_executor_internals_only() -> None:
    private = _child.ppe_private_names()
    assert {"_processes", "_executor_manager_thread", "_call_queue", "_broken"} <= private

    def reads_internals(self: object) -> None:
        executor = self.executor  # type: ignore[attr-defined]
        assert len(executor._processes) == 5
        assert executor._call_queue is not None

    def reads_a_future(self: object) -> None:
        future = self.future  # type: ignore[attr-defined]
        assert future._state == "FINISHED"

    assert _child.private_reads(reads_internals, private) == ["_call_queue", "_processes"]
    assert _child.private_reads(reads_a_future, private) == []

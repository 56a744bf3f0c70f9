"""Print the compat suites' totals at the end of every run that collected them.

The issue asks for ``compat/`` in CI "with its totals printed": ``pytest -q`` shows no output
of passing tests, so the totals go into the terminal summary instead.
"""

from __future__ import annotations

from collections import Counter

import pytest

_OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    per_suite: dict[str, Counter[str]] = {}
    extra: list[str] = []
    for outcome in _OUTCOMES:
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if not nodeid.startswith("compat/"):
                continue
            if outcome != "passed" or getattr(report, "when", "call") == "call":
                suite = nodeid.split("/")[1]
                per_suite.setdefault(suite, Counter())[outcome] += 1
            for name, value in getattr(report, "user_properties", []):
                if name == "compat_totals":
                    extra.extend(str(line) for line in value)
    if not per_suite:
        return
    terminalreporter.write_sep("-", "compat totals")
    for suite, counts in sorted(per_suite.items()):
        parts = ", ".join(f"{counts[o]} {o}" for o in _OUTCOMES if counts[o])
        terminalreporter.write_line(f"compat/{suite}: {parts}")
    for line in dict.fromkeys(extra):
        terminalreporter.write_line(f"compat/cpython stdlib suite: {line}")

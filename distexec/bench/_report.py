"""Render the benchmark's JSON document as tables a person reads.

Layer: tooling (``python -m distexec.bench``). Imports: stdlib.

One markdown-style table per case: a row per backend, a column per metric (median over
repetitions, min to max in parentheses), then the ratio columns (to ppe, to the floor). A backend
that failed in every repetition shows ``error: <message>`` in place of its numbers.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

_WIDTH = 100
DASH = "\u2013"
TIMES = "\u00d7"


def fmt_num(x: float) -> str:
    """Three significant digits, thousands separators from 1000 up, no exponent."""
    if x != x:  # NaN
        return "nan"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_ratio(x: float) -> str:
    """A ratio with fewer decimals as it grows: ``0.25``, ``12.5``, ``250``."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_stat(
    stat: Mapping[str, Any],
    num: Callable[[float], str] = fmt_num,
    *,
    show_range: bool = True,
    unit: str = "",
) -> str:
    """``median (min-max)`` with an en dash, or the bare median; a mode as is.

    *unit* follows the median only: ``1.20x (1.10-1.30)``.
    """
    if "mode" in stat:
        mode = stat["mode"]
        return f"{mode:,}" if isinstance(mode, int | float) and mode == int(mode) else str(mode)
    med = num(stat["median"]) + unit
    lo, hi = num(stat["min"]), num(stat["max"])
    if not show_range or lo == hi:
        return med
    return f"{med} ({lo}{DASH}{hi})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned markdown table. A row of length 3 after a full header spans its last cell."""
    widths = [len(h) for h in header]
    for r in rows:
        spans = len(r) < len(header)
        for i, cell in enumerate(r[: len(r) - 1] if spans else r):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(widths[i]) if i < len(cells) - 1 or len(cells) == len(header) else c
            for i, c in enumerate(cells)
        ]
        return "| " + " | ".join(padded) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return out


def render_case(name: str, case: Mapping[str, Any]) -> list[str]:
    """The lines for one case: title, what is measured, the table, notes."""
    metrics = case["metrics"]
    ratio_metrics = [m for m in metrics if m["ratio"]]
    ref, floor = case["reference"], case["floor"]
    refs = [(label, who) for label, who in ((f"vs_{ref}", ref), ("vs_floor", floor)) if who]
    out = [f"## {name}: {case['title']}", ""]
    out += textwrap.wrap(case["explain"], _WIDTH)
    if floor:
        out += textwrap.wrap(f"Floor: {floor}, {case['floor_rule']}.", _WIDTH)
    else:
        out.append("Floor: none (no raw backend produced numbers).")
    out.append("")

    header = ["backend", "reps", *(m["label"] for m in metrics)]
    for _label, who in refs:
        for m in ratio_metrics:
            header.append(f"{m['ratio']} ÷ {who}" if len(ratio_metrics) > 1 else f"÷ {who}")
    rows: list[list[str]] = []
    notes: list[str] = []
    for backend, e in case["backends"].items():
        reps = f"{e['reps_ok']}/{e['reps']}"
        if "summary" not in e:
            rows.append([backend, reps, _one_line(e.get("error", "no result"))])
            continue
        row = [backend, reps]
        for m in metrics:
            stat = e["summary"].get(m["key"])
            row.append(fmt_stat(stat, show_range=m.get("show_range", True)) if stat else "")
        for label, _who in refs:
            for m in ratio_metrics:
                stat = e["ratios"].get(label, {}).get(m["key"])
                row.append(fmt_stat(stat, fmt_ratio, unit=TIMES) if stat else DASH)
        rows.append(row)
        notes += [f"{backend}: {_one_line(err)}" for err in e.get("errors", [])]
    out += _table(header, rows)
    notes += _leftover_notes(case)
    if notes:
        out.append("")
        out += [f"- {n}" for n in notes]
    out.append("")
    return out


def _one_line(msg: str, limit: int = 200) -> str:
    msg = " ".join(str(msg).split())
    msg = msg if msg.startswith(("error:", "n/a", "skipped")) else f"error: {msg}"
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def short_cmd(cmd: str) -> str:
    """A process's command line, short: ``python -c "from X import main..."`` becomes ``X``."""
    if " -c " in cmd:
        m = re.search(r"(?:from|import)\s+([\w.]+)", cmd.split(" -c ", 1)[1])
        if m:
            return m.group(1)
    return cmd if len(cmd) <= 60 else cmd[:59] + "…"


def _leftover_notes(case: Mapping[str, Any]) -> list[str]:
    notes = []
    for backend, e in case["backends"].items():
        left = sorted({short_cmd(str(p["cmd"])) for r in e["runs"] for p in r.get("leftover", [])})
        reaped = sorted({short_cmd(str(p["cmd"])) for r in e["runs"] for p in r.get("reaped", [])})
        warnings = sorted({w for r in e["runs"] for w in r.get("warnings", [])})
        if left:
            notes.append(
                f"{backend}: alive after teardown returned: {', '.join(left)}"
                " (ended by the driver, or exit with it)"
            )
        if reaped:
            notes.append(f"{backend}: outlived its driver, ended by pid: {', '.join(reaped)}")
        notes += [f"{backend}: {w}" for w in warnings]
    return notes


def render(doc: Mapping[str, Any]) -> str:
    """The whole report."""
    s, mach = doc["settings"], doc["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in mach.get("versions", {}).items())
    out = [
        f"# python -m distexec.bench: {s['reps']} repetition(s)"
        + (" (--quick)" if s["quick"] else ""),
        "",
        *textwrap.wrap(
            f"Python {mach['python']} on {mach['platform']}, {mach['usable_cpus'] or mach['cpus']}"
            f" usable CPUs, start method {mach['start_method']}, load {mach['load1_before']:.2f}"
            f" → {mach.get('load1_after', float('nan')):.2f}; {versions}. Every (case, backend,"
            " repetition) ran in a fresh driver process; backends interleaved, order rotated"
            f" per repetition. {doc.get('elapsed_s', 0):.0f} s in all.",
            _WIDTH,
        ),
        "",
        *textwrap.wrap(
            f"Cells: median over repetitions (min{DASH}max). Ratio columns: time ratios taken"
            f" within each repetition, then their median (min{DASH}max); >1 = slower than the"
            " column's reference. A failed cell reads 'error: ...', and 'n/a' means the case"
            " has no measurement for that backend.",
            _WIDTH,
        ),
        "",
    ]
    for name, case in doc["cases"].items():
        out += render_case(name, case)
    return "\n".join(out).rstrip() + "\n"

"""The command line of ``python -m distexec.bench``.

Layer: tooling. Imports: stdlib and the bench's own modules.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from distexec.bench._backends import BACKENDS
from distexec.bench._cases import CASES, Settings
from distexec.bench._report import render
from distexec.bench._runner import Plan, run

_KIND_ORDER = {"floor": 0, "peer": 1, "distexec": 2}


def default_backends() -> list[str]:
    """Every registered backend: floors, then peers, then distexec's."""
    return sorted(BACKENDS, key=lambda b: _KIND_ORDER[BACKENDS[b].kind])


def _names(value: str | None, known: Sequence[str], default: Sequence[str], what: str) -> list[str]:
    if value is None or value == "all":
        return list(default if value is None else known)
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what}: {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(known)}"
        )
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so tests and docs can inspect it)."""
    ap = argparse.ArgumentParser(
        prog="python -m distexec.bench",
        description="Run the same cases on distexec, ProcessPoolExecutor, loky and a raw socket "
        "floor, interleaved, and print medians and ratios.",
    )
    ap.add_argument(
        "--cases",
        help="comma-separated, or 'all' (default: "
        + ",".join(n for n, c in CASES.items() if c.default)
        + ")",
    )
    ap.add_argument("--backends", help="comma-separated, or 'all' (default: all)")
    ap.add_argument("--reps", type=int, help="repetitions per case (default 5; --quick: 2)")
    ap.add_argument("--quick", action="store_true", help="small sizes and few repetitions")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    ap.add_argument(
        "--size-mb", type=float, help="bandwidth payload in MB (default 100; --quick: 10)"
    )
    ap.add_argument("--timeout", type=float, help="seconds per driver process (default: per case)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--list", action="store_true", help="list cases and backends, then exit")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark.

    Returns 0 even when some cells are errors; 2 for a bad command line, 130 if interrupted.
    """
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.list:
        for name, case in CASES.items():
            print(f"case     {name:22} {case.title}")
        for name in default_backends():
            print(f"backend  {name:22} {BACKENDS[name].description}")
        return 0
    try:
        cases = _names(args.cases, list(CASES), [n for n, c in CASES.items() if c.default], "case")
        backends = _names(args.backends, default_backends(), default_backends(), "backend")
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    reps = args.reps if args.reps is not None else (2 if args.quick else 5)
    if reps < 1:
        ap.error("--reps must be at least 1")
    if args.size_mb is not None and args.size_mb <= 0:
        ap.error("--size-mb must be positive")

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    plan = Plan(
        cases=cases,
        backends=backends,
        reps=reps,
        settings=Settings(quick=args.quick, size_mb=args.size_mb),
        timeout_s=args.timeout,
        progress=(lambda _m: None) if args.quiet else progress,
    )
    try:
        doc = run(plan)
    except KeyboardInterrupt:
        print("interrupted: the running driver and its processes were ended", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(render(doc), end="")
    return 0

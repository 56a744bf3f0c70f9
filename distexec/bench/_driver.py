"""One measurement, one fresh process: ``python -m distexec.bench._driver``.

Layer: tooling (``python -m distexec.bench``). Imports: stdlib and the bench's own modules; the
backend imports its library when prepared.

The orchestrator starts one driver per (case, backend, repetition), so no backend inherits
another's threads, caches or children. The driver writes one JSON object to ``--result``:
``{"ok": true, "metrics": {...}, "info": {...}, "leftover": [...], "warnings": [...]}`` or
``{"ok": false, "error": "..."}``. Before it exits it ends, by pid, every descendant still alive
after the backend's teardown, and lists them under ``leftover``; a ``resource_tracker`` is only
listed, as it ignores SIGTERM and exits when this process does.

Run as ``python -m``, this module is ``__main__``: ``main_identity`` below is then a function of
``__main__``, as one defined in a user's script is (the ``*_main`` cases call it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

from distexec.bench import _procs
from distexec.bench._backends import BACKENDS, BenchUnavailable
from distexec.bench._measure import lookup

#: Seconds the driver gives its descendants to exit on their own after teardown.
EXIT_GRACE = 0.2


def main_identity(x: object) -> object:
    """Return *x*, like ``dxb_tasks.identity``, but defined at the top level of the script.

    With the driver run as ``python -m distexec.bench._driver`` this is
    ``__main__.main_identity``, just as ``def f(x): return x`` in a user's script is
    ``__main__.f``. Workers that do not import the master's script get it by value (distexec,
    loky: cloudpickle); ProcessPoolExecutor names it by reference and its workers find it in
    their copy of ``__main__``. ``_measure.main_function`` fetches it from
    ``sys.modules["__main__"]`` and refuses anything that is not a function of ``__main__``.
    """
    return x


def run(case: str, backend: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Measure *case* on *backend*; never raises for the backend's failures."""
    m = lookup(case, backend)
    if m is None:
        return {"ok": False, "na": True, "error": f"n/a: no {case} measurement for {backend}"}
    before = set(_procs.descendants(os.getpid()))  # not ours to end (run in-process: a test's)
    b = BACKENDS[backend]()
    result: dict[str, Any]
    warnings: list[str] = []
    try:
        b.prepare()
        if m.lifecycle == "warm":
            b.start(params["workers"])
            b.ping_all()
            b.settle()
        outcome = m.fn(b, params)
        result = {"ok": True, "metrics": outcome.metrics, "info": outcome.info}
    except BenchUnavailable as exc:
        result = {"ok": False, "error": str(exc)}
    except Exception as exc:
        result = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    finally:
        try:
            b.stop()
        except Exception as exc:
            warnings.append(f"teardown failed: {type(exc).__name__}: {exc}")
    try:
        if result["ok"]:
            result["info"] = {**b.info(), **result["info"]}
    except Exception as exc:
        warnings.append(f"info failed: {type(exc).__name__}: {exc}")
    result["leftover"] = end_leftovers(spare=before)
    result["warnings"] = warnings
    return result


def end_leftovers(spare: AbstractSet[int] = frozenset()) -> list[dict[str, object]]:
    """End this process's descendants still alive after teardown, except those in *spare*
    (there before the measurement began); describe each."""
    alive = [p for p in _procs.descendants(os.getpid()) if p not in spare]
    trackers = [p for p in alive if "resource_tracker" in _procs.describe(p)]
    left = _procs.wait_gone([p for p in alive if p not in trackers], EXIT_GRACE)
    records: list[dict[str, object]] = [
        {"pid": p, "cmd": _procs.describe(p), "signal": None} for p in trackers
    ]
    return records + _procs.end(left)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the orchestrator's arguments, measure, write the result file."""
    ap = argparse.ArgumentParser(prog="python -m distexec.bench._driver")
    ap.add_argument("--case", required=True)
    ap.add_argument("--backend", required=True, choices=sorted(BACKENDS))
    ap.add_argument("--params", required=True, help="JSON object of the case's parameters")
    ap.add_argument("--result", required=True, type=Path, help="file to write the JSON result")
    args = ap.parse_args(argv)
    result = run(args.case, args.backend, json.loads(args.params))
    tmp = args.result.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(args.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

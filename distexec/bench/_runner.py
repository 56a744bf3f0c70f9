"""The orchestrator: drivers in fresh processes, interleaved repetitions, medians and ratios.

Layer: tooling (``python -m distexec.bench``). Imports: stdlib and the bench's own modules.

For each case, each repetition runs every backend once, one after another, each in a fresh
driver process (``_driver``); the order rotates by one from a repetition to the next, so drift
in the machine's state hits every backend alike. Ratios are taken within a repetition and then
summarised over repetitions (median, min, max). Every driver gets a marker variable in its
environment; after it exits, anything still carrying the marker is ended by pid and reported.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from distexec.bench import _procs
from distexec.bench._backends import BACKENDS
from distexec.bench._cases import CASES, Case, Metric, Settings
from distexec.bench._measure import lookup

SCHEMA = "distexec.bench/1"
#: Environment variable that marks a driver and everything it starts (value: a uuid per driver).
MARKER_ENV = "DISTEXEC_BENCH_RUN"
#: Directory holding the ``distexec`` package, put first on the drivers' ``PYTHONPATH``.
_ROOT = Path(__file__).resolve().parents[2]
#: Seconds marked processes get to exit on their own after their driver has.
REAP_GRACE = 1.0
#: ``--quick`` caps every driver's timeout at this many seconds.
QUICK_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Plan:
    """What one invocation runs."""

    cases: Sequence[str]
    backends: Sequence[str]
    reps: int
    settings: Settings = field(default_factory=Settings)
    #: Seconds per driver; None: each case's own (capped by ``--quick``).
    timeout_s: float | None = None
    progress: Callable[[str], None] = lambda _msg: None


_T = TypeVar("_T")


def rotated(items: Sequence[_T], k: int) -> list[_T]:
    """*items* rotated left by *k*: the order of repetition *k*."""
    if not items:
        return []
    k %= len(items)
    return [*items[k:], *items[:k]]


def _tail(path: Path, lines: int = 20) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def reap(marker: str) -> list[dict[str, object]]:
    """End, by pid, every process still carrying *marker* after a short grace."""
    left = _procs.wait_gone(_procs.carrying(MARKER_ENV, marker), REAP_GRACE)
    return _procs.end(left) if left else []


def run_driver(
    case: str, backend: str, params: Mapping[str, Any], timeout: float, workdir: Path
) -> dict[str, Any]:
    """Run one driver process and return its result record; never raises for its failures."""
    tag = f"{case}-{backend}-{uuid.uuid4().hex[:8]}"
    result_path = workdir / f"{tag}.json"
    out_path, err_path = workdir / f"{tag}.out", workdir / f"{tag}.err"
    marker = uuid.uuid4().hex
    env = dict(os.environ)
    env[MARKER_ENV] = marker
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "distexec.bench._driver", "--case", case, "--backend", backend]
    cmd += ["--params", json.dumps(params), "--result", str(result_path)]
    timed_out = False
    t0 = time.monotonic()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, start_new_session=True
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_session(proc)
        except BaseException:  # Ctrl-C: the driver's own session did not get the SIGINT
            _kill_session(proc)
            reap(marker)
            raise
    wall = time.monotonic() - t0
    reaped = reap(marker)
    rec: dict[str, Any]
    if timed_out:
        rec = {"ok": False, "timed_out": True, "error": f"timed out after {timeout:g} s"}
    elif result_path.exists():
        rec = json.loads(result_path.read_text())
    else:
        last = [line for line in _tail(err_path) if line.strip()][-1:]
        rec = {
            "ok": False,
            "error": f"driver exited with code {proc.returncode}"
            + (f": {last[0].strip()}" if last else ""),
        }
    rec["wall_s"] = wall
    rec["marker"] = marker
    rec["reaped"] = reaped
    if not rec["ok"] and not rec.get("na"):
        rec["stderr_tail"] = _tail(err_path)
    return rec


def _kill_session(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the driver's own session (it and the children that stayed in it), then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _stat(values: Sequence[float], how: str) -> dict[str, Any]:
    if how == "mode":
        return {
            "mode": Counter(values).most_common(1)[0][0],
            "values": list(values),
            "n": len(values),
        }
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _ratio(m: Metric, value: float, ref: float) -> float:
    """Time ratio of *value* to *ref*: >1 means slower than the reference."""
    return value / ref if m.better == "lower" else ref / value


def summarize(
    case: Case, params: Mapping[str, Any], backends: Sequence[str], runs: Mapping[str, list[Any]]
) -> dict[str, Any]:
    """Medians per backend, the floor, and per-repetition ratios to ppe and to the floor."""
    metrics = case.metrics(params)
    entries: dict[str, dict[str, Any]] = {}
    for b in backends:
        recs = runs[b]
        ok = [r for r in recs if r["ok"]]
        entry: dict[str, Any] = {
            "kind": BACKENDS[b].kind,
            "reps": len(recs),
            "reps_ok": len(ok),
            "runs": recs,
        }
        if ok:
            entry["summary"] = {
                m.key: _stat(vals, m.summary)
                for m in metrics
                if (vals := [r["metrics"][m.key] for r in ok if m.key in r["metrics"]])
            }
        failed = [r for r in recs if not r["ok"]]
        if failed:
            first = next((r for r in failed if not r.get("skipped")), failed[0])
            if not ok:
                entry["error"] = first["error"]
            entry["errors"] = sorted({r["error"] for r in failed})
        entries[b] = entry

    primary = case.primary(params)
    floors = [
        b
        for b in backends
        if BACKENDS[b].kind == "floor" and primary.key in entries[b].get("summary", {})
    ]
    floor = None
    if floors:
        sign = 1 if primary.better == "lower" else -1
        floor = min(floors, key=lambda b: sign * entries[b]["summary"][primary.key]["median"])

    for b in backends:
        entries[b]["ratios"] = {}
        for label, ref in ((f"vs_{case.reference}", case.reference), ("vs_floor", floor)):
            if ref is None or ref not in runs:
                continue
            per_metric: dict[str, Any] = {}
            for m in metrics:
                if not m.ratio:
                    continue
                per_rep: list[float | None] = []
                for mine, theirs in zip(runs[b], runs[ref], strict=True):
                    if (
                        mine["ok"]
                        and theirs["ok"]
                        and m.key in mine["metrics"]
                        and m.key in theirs["metrics"]
                    ):
                        per_rep.append(_ratio(m, mine["metrics"][m.key], theirs["metrics"][m.key]))
                    else:
                        per_rep.append(None)
                vals = [r for r in per_rep if r is not None]
                if vals:
                    per_metric[m.key] = {**_stat(vals, "median"), "per_rep": per_rep}
            entries[b]["ratios"][label] = per_metric

    return {
        "title": case.title,
        "explain": case.explain(params),
        "params": dict(params),
        "metrics": [
            {
                "key": m.key,
                "label": m.label,
                "better": m.better,
                "ratio": m.ratio,
                "summary": m.summary,
                "show_range": m.show_range,
            }
            for m in metrics
        ],
        "reference": case.reference if case.reference in backends else None,
        "floor": floor,
        "floor_rule": "best of "
        + (", ".join(b for b in backends if BACKENDS[b].kind == "floor") or "no floor backend")
        + f" by {primary.label}, median over repetitions",
        "backends": entries,
    }


def _versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for pkg in ("numpy", "loky", "cloudpickle"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    try:
        from distexec._version import __version__

        out["distexec"] = __version__
    except ImportError:
        out["distexec"] = "?"
    return out


def machine_info() -> dict[str, Any]:
    """Facts about the machine a reader needs to compare two runs."""
    import multiprocessing

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "start_method": multiprocessing.get_start_method(),
        "load1_before": os.getloadavg()[0],
        "versions": _versions(),
    }
    with contextlib.suppress(OSError):
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        info["transparent_hugepage"] = (
            thp.split("[")[1].split("]")[0] if "[" in thp else thp.strip()
        )
    if "OPENBLAS_CORETYPE" in os.environ:
        info["OPENBLAS_CORETYPE"] = os.environ["OPENBLAS_CORETYPE"]
    return info


def run(plan: Plan) -> dict[str, Any]:
    """Run *plan*; return the JSON document (see ``__init__`` for its layout)."""
    t_start = time.monotonic()
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "settings": {
            "cases": list(plan.cases),
            "backends": list(plan.backends),
            "reps": plan.reps,
            "quick": plan.settings.quick,
            "size_mb": plan.settings.size_mb,
            "timeout_s": plan.timeout_s,
        },
        "machine": machine_info(),
        "backends": {
            b: {"kind": BACKENDS[b].kind, "description": BACKENDS[b].description}
            for b in plan.backends
        },
        "cases": {},
    }
    with tempfile.TemporaryDirectory(prefix="distexec-bench-") as tmp:
        for name in plan.cases:
            doc["cases"][name] = _run_case(plan, CASES[name], Path(tmp))
    doc["machine"]["load1_after"] = os.getloadavg()[0]
    doc["reaped"] = [
        {**r, "case": name, "backend": b}
        for name, c in doc["cases"].items()
        for b, e in c["backends"].items()
        for run_ in e["runs"]
        for r in run_.get("reaped", [])
    ]
    doc["elapsed_s"] = time.monotonic() - t_start
    return doc


def _run_case(plan: Plan, case: Case, workdir: Path) -> dict[str, Any]:
    params = case.params(plan.settings)
    timeout = plan.timeout_s or (
        min(case.timeout_s, QUICK_TIMEOUT) if plan.settings.quick else case.timeout_s
    )
    runs: dict[str, list[Any]] = {b: [] for b in plan.backends}
    skip: dict[str, str] = {}
    for rep in range(plan.reps):
        load1 = os.getloadavg()[0]
        for position, b in enumerate(rotated(plan.backends, rep)):
            if b in skip:
                rec: dict[str, Any] = {"ok": False, "skipped": True, "error": skip[b]}
            elif lookup(case.name, b) is None:
                rec = {"ok": False, "na": True, "error": f"n/a: no {case.name} measurement for {b}"}
            else:
                rec = run_driver(case.name, b, params, timeout, workdir)
                if rec.get("timed_out"):
                    skip[b] = f"skipped: timed out after {timeout:g} s in repetition {rep + 1}"
                plan.progress(
                    f"[{case.name} {rep + 1}/{plan.reps}] {b}: {rec['wall_s']:.2f} s "
                    + ("ok" if rec["ok"] else rec["error"])
                )
            rec.update(rep=rep, position=position, load1=load1)
            runs[b].append(rec)
    return summarize(case, params, plan.backends, runs)

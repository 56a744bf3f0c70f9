"""``python -m distexec.bench``: distexec against ProcessPoolExecutor, loky and a raw floor.

Layer: tooling, outside the library's layers: nothing in distexec imports it. Imports: only
the bench's own modules, lazily, so that ``python -m distexec.bench._driver`` stays light.

Cases (``--list`` shows them): ``latency`` (sequential round trips of a trivial function),
``throughput`` (map over 200,000 small ints at the best chunk size), ``throughput_unbatched``
(chunksize=1), ``latency_main`` and ``throughput_unbatched_main`` (the same two with the
function defined in the driver's ``__main__``, as in a user's script: distexec and loky ship it
by value, ProcessPoolExecutor by reference; the raw floors keep the importable one),
``bandwidth`` (a 100 MB float64 array to a worker and back), ``startup`` (from nothing to 2
workers that each answered one call) and ``caching_pool`` (distexec only: 100 calls of a closure
over 50 MB through a ``CachingPool``, shipping included, against a module-level function with
the array stashed on the workers by hand). Backends: ``raw_tcp`` and ``raw_unix`` (the floor:
pickle 5 over one socket per worker), ``ppe`` (ProcessPoolExecutor), ``loky``, ``distexec``
(addprocs / remotecall_fetch / pmap) and ``distexec_executor``. Opt-in (named, or ``--cases
all``), distexec only, each with its own sshd (``_sshd``): ``startup_ssh`` (4 workers over SSH
to 127.0.0.1 against 4 local ones) and ``latency_ssh`` (round trips to a worker over SSH in
another network namespace against local ones, with and without MACs).

Every (case, backend, repetition) runs in a fresh driver process; each repetition runs every
backend of a case in a row, in an order rotated per repetition; ratios are computed within a
repetition, then summarised (median, min, max). A backend that cannot run reads
``error: <message>``; one with no measurement for a case reads ``n/a``.

``--json`` prints one document::

    {"schema": "distexec.bench/1", "settings": {...}, "machine": {...}, "backends": {...},
     "elapsed_s": s, "reaped": [...],
     "cases": {CASE: {"title", "explain", "params", "metrics": [{"key", "label", "better",
                      "ratio", "summary", "show_range"}], "reference": "ppe",
                      "floor": "raw_unix" | null, "floor_rule",
                      "backends": {BACKEND: {"kind", "reps", "reps_ok", "error"?, "errors"?,
                          "summary": {METRIC: {"median", "min", "max", "n"} | {"mode", ...}},
                          "ratios": {"vs_ppe" | "vs_floor": {METRIC: {"median", "min", "max",
                                     "n", "per_rep": [ratio | null, ...]}}},
                          "runs": [{"ok", "metrics" | "error", "info", "rep", "position",
                                    "wall_s", "marker", "leftover", "reaped", ...}]}}}}}

Extending: a backend is a ``_backends.Backend`` subclass decorated with ``@register``; a case
is a ``_cases.Case`` passed to ``register_case`` plus a function decorated with
``@_measure.measure(case, backends=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark as ``python -m distexec.bench`` would, with *argv*."""
    from distexec.bench._cli import main as cli_main

    return cli_main(argv)

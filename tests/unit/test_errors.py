"""The lost-worker errors: ``BrokenProcessPool``s that load on first use.

``WorkerLostError``, ``WorkerDiedError`` and ``WorkerUnresponsiveError`` live in
``distexec._worker_lost`` and come out of ``distexec.errors`` through its module
``__getattr__``, so that importing distexec (every worker does) skips
``concurrent.futures.process`` and the ``multiprocessing`` modules it imports.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

import distexec as dx
import distexec.errors

ROOT = Path(__file__).resolve().parents[2]
LOST = ["WorkerDiedError", "WorkerLostError", "WorkerUnresponsiveError"]


def _fresh_python(code: str) -> object:
    """Run *code* in a new interpreter that imports this checkout; return what it printed
    (one JSON value)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize("name", LOST)
def test_a_lost_worker_error_is_a_broken_process_pool(name: str) -> None:
    cls = getattr(dx, name)
    assert cls is getattr(distexec.errors, name)
    assert issubclass(cls, BrokenProcessPool)
    assert issubclass(cls, dx.ProcessExitedException)
    assert cls.__module__ == "distexec.errors" and cls.__qualname__ == name
    assert name in dir(distexec.errors) and name in distexec.errors.__all__


def test_a_lost_worker_error_pickles_by_its_public_name() -> None:
    err = dx.WorkerDiedError("worker 3 died", pid=3, exitcode=-9, reason="killed by SIGKILL")
    data = pickle.dumps(err)
    assert b"distexec.errors" in data and b"_worker_lost" not in data
    back = pickle.loads(data)
    assert type(back) is dx.WorkerDiedError
    assert (back.pid, back.exitcode, back.signal, back.reason) == (3, -9, 9, "killed by SIGKILL")


def test_an_unknown_name_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'WorkerGoneError'"):
        distexec.errors.WorkerGoneError  # noqa: B018


def test_import_skips_multiprocessing_until_a_lost_worker_error_is_asked_for() -> None:
    code = (
        "import json, sys\n"
        "import distexec\n"
        "before = 'concurrent.futures.process' in sys.modules\n"
        "from concurrent.futures.process import BrokenProcessPool\n"
        "from distexec.errors import *\n"
        "print(json.dumps([before, issubclass(WorkerUnresponsiveError, BrokenProcessPool),\n"
        "                  distexec.WorkerLostError is WorkerLostError]))\n"
    )
    assert _fresh_python(code) == [False, True, True]

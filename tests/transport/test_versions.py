"""A worker of another distexec or Python version is refused, naming both versions.

Layer: tests. Imports: stdlib, pytest, distexec.

The odd worker is the real ``distexec.worker`` with its version patched in the process
before ``main()`` runs (``python -c``); a small manager launches it like LocalManager does.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import helpers
import pytest

import distexec as dx
from distexec.managers.base import ClusterManager, WorkerConfig

pytestmark = [pytest.mark.timeout(90)]

PATCHES = {
    "distexec": "import distexec._version as v; v.__version__ = '9.9.9'",
    # The hello reads sys.version_info, which cannot be patched: the worker's report is.
    "python": (
        "from distexec._transport import handshake as h; _versions = h.local_versions; "
        "h.local_versions = lambda: {**_versions(), 'python': '3.99'}"
    ),
}


class OddWorkerManager(ClusterManager):
    def __init__(self, patch: str) -> None:
        self.patch = patch
        self.procs: list[subprocess.Popen[bytes]] = []

    def launch(
        self,
        params: Mapping[str, Any],
        launched: list[WorkerConfig],
        launch_ntfy: threading.Condition,
    ) -> None:
        code = f"{self.patch}\nimport distexec.worker as w\nw.main()"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.procs.append(proc)
        assert proc.stdin is not None
        proc.stdin.write(params["cookie"] + b"\n")
        proc.stdin.flush()
        with launch_ntfy:
            launched.append(WorkerConfig(io=proc.stdout, process=proc, host="127.0.0.1"))
            launch_ntfy.notify_all()


@pytest.fixture
def cleanup() -> Iterator[list[OddWorkerManager]]:
    managers: list[OddWorkerManager] = []
    yield managers
    for m in managers:
        for proc in m.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)


@pytest.mark.parametrize(
    ("what", "here", "there"),
    [
        ("distexec", dx.__version__, "9.9.9"),
        ("python", ".".join(platform.python_version_tuple()[:2]), "3.99"),
    ],
)
def test_another_version_is_a_version_mismatch_naming_both(
    cleanup: list[OddWorkerManager], what: str, here: str, there: str
) -> None:
    manager = OddWorkerManager(PATCHES[what])
    cleanup.append(manager)
    started = time.monotonic()
    with pytest.raises(dx.VersionMismatchError) as info:
        dx.addprocs(manager)
    assert time.monotonic() - started < 15
    text = str(info.value)
    assert f"{what} {here} here vs {there} on worker" in text, text
    assert dx.workers() == [1]
    # The odd worker was stopped, not left waiting for a master.
    for proc in manager.procs:
        assert proc.wait(10) is not None


def test_cloudpickle_is_imported_only_when_needed() -> None:
    """distexec imports cloudpickle when it first pickles by value, not before (a worker
    start saves ~5 ms); the hello still names its version, and a module registered for
    pickling by value after distexec's import is still pickled by value."""
    script = (
        "import sys, distexec\n"
        "from distexec._transport import handshake\n"
        "from distexec._protocol import byvalue\n"
        "assert 'cloudpickle' not in sys.modules, 'imported with distexec'\n"
        "v = handshake.local_versions()['cloudpickle']\n"
        "assert 'cloudpickle' not in sys.modules, 'imported for the hello'\n"
        "assert not byvalue.any_registered() and not byvalue.by_value('json')\n"
        "import cloudpickle, json\n"
        "assert v == cloudpickle.__version__, (v, cloudpickle.__version__)\n"
        "cloudpickle.register_pickle_by_value(json)\n"
        "assert byvalue.any_registered() and byvalue.by_value('json.decoder')\n"
        "print('ok')\n"
    )
    assert helpers.run_python(script).stdout.strip() == "ok"

"""The bench's opt-in SSH cases end to end: ``startup_ssh`` and ``latency_ssh`` give numbers.

Layer: tests. Imports: stdlib, pytest, sshinfra (for its skip rule only).

One ``python -m distexec.bench --quick`` run (module fixture) serves both tests. The bench
starts its own sshd and namespace (``distexec/bench/_sshd.py``); where it reports them
unavailable (no OpenSSH, no namespaces) the tests skip as the other tests here do, or fail
under ``DISTEXEC_REQUIRE_SSH=1`` / ``DISTEXEC_REQUIRE_NETNS=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sshinfra import (
    REQUIRE_NETNS,
    REQUIRE_SSH,
    NetnsUnavailable,
    SSHUnavailable,
    skip_or_fail,
)

ROOT = Path(__file__).resolve().parents[2]
CASES = ("startup_ssh", "latency_ssh")


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    args = ["--quick", "--cases", ",".join(CASES), "--backends", "distexec", "--json", "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-m", "distexec.bench", *args],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    assert out["reaped"] == [], out["reaped"]
    return out


def _entry(doc: dict[str, Any], case: str, *, netns: bool = False) -> dict[str, Any]:
    """The case's distexec entry; skip (or fail) where the bench said it is unavailable, by
    the rule of ``tests/ssh/conftest.py``'s ``sshd`` (*netns*: ``netns_hosts``) fixture."""
    entry: dict[str, Any] = doc["cases"][case]["backends"]["distexec"]
    runs = entry["runs"]
    # BenchUnavailable: an error without a traceback, worded as sshinfra words its reasons.
    unavailable = [
        r["error"] for r in runs if not r["ok"] and "traceback" not in r and not r.get("timed_out")
    ]
    if unavailable and len(unavailable) == len(runs):
        reason = unavailable[0]
        if reason.startswith("network namespaces unavailable"):
            skip_or_fail(NetnsUnavailable(reason), REQUIRE_NETNS)
        if reason.startswith("OpenSSH unavailable"):
            skip_or_fail(SSHUnavailable(reason), REQUIRE_SSH, *([REQUIRE_NETNS] if netns else []))
    failed = [
        {k: r.get(k) for k in ("error", "traceback", "stderr_tail")} for r in runs if not r["ok"]
    ]
    assert not failed, failed
    assert entry["reps_ok"] == entry["reps"] == doc["settings"]["reps"] >= 1
    for r in runs:
        assert r["leftover"] == [] and r["reaped"] == [] and r["warnings"] == [], r
    return entry


@pytest.mark.ssh
@pytest.mark.timeout(240)
def test_startup_ssh_times_four_ssh_and_four_local_workers(doc: dict[str, Any]) -> None:
    entry = _entry(doc, "startup_ssh")
    for r in entry["runs"]:
        m, info = r["metrics"], r["info"]
        for key in ("ssh_ready_ms", "mux_ready_ms", "local_ready_ms", "ssh_teardown_ms"):
            assert m[key] > 0, (key, m)
        assert m["ready_ratio"] == pytest.approx(m["ssh_ready_ms"] / m["local_ready_ms"])
        assert m["mux_ratio"] == pytest.approx(m["mux_ready_ms"] / m["local_ready_ms"])
        assert m["ssh_setup_ms"] > 0 and m["mux_setup_ms"] > 0
        assert m["ready_ratio_setup_aside"] == pytest.approx(
            (m["ssh_ready_ms"] - m["ssh_setup_ms"]) / m["local_ready_ms"]
        )
        ssh_pids, local_pids = info["ssh_worker_ospids"], info["local_worker_ospids"]
        assert len(set(ssh_pids)) == 4 and len(set(local_pids)) == 4
        assert len(set(info["mux_worker_ospids"])) == 4
        assert not set(ssh_pids) & set(local_pids)
        assert info["destination"].split("@")[1].startswith("127.0.0.1:")
    assert entry["summary"]["ssh_ready_ms"]["median"] > 0


@pytest.mark.ssh
@pytest.mark.netns
@pytest.mark.timeout(240)
def test_latency_ssh_compares_a_namespace_worker_with_local_ones(doc: dict[str, Any]) -> None:
    entry = _entry(doc, "latency_ssh", netns=True)
    for r in entry["runs"]:
        m, info = r["metrics"], r["info"]
        for who in ("ssh", "local", "local_mac"):
            assert 0 < m[f"{who}_median_us"] <= m[f"{who}_p99_us"], (who, m)
        assert m["ratio"] == pytest.approx(m["ssh_median_us"] / m["local_median_us"])
        assert m["ratio_mac"] == pytest.approx(m["ssh_median_us"] / m["local_mac_median_us"])
        assert info["frame_macs"] == {"ssh": True, "local": False, "local_mac": True}
        assert info["ssh_host"].startswith("198.19.")
        assert len(set(info["worker_ospids"].values())) == 3
        assert info["calls_per_worker"] >= doc["cases"]["latency_ssh"]["params"]["calls"]
    # the namespace the bench made is gone
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    names = {r["info"]["ssh_netns"] for r in entry["runs"]}
    assert not any(name in listing.stdout for name in names)

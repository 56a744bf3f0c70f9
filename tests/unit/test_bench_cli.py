"""``python -m distexec.bench``: the command line end to end, and its parts without processes."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest
from helpers import wait_until

from distexec.bench import _driver as bench_driver
from distexec.bench import _procs
from distexec.bench._backends import BACKENDS, Backend
from distexec.bench._cases import CASES, Settings
from distexec.bench._cli import main
from distexec.bench._driver import run as run_driver_in_process
from distexec.bench._measure import main_function
from distexec.bench._report import render
from distexec.bench._runner import MARKER_ENV, reap, rotated, summarize
from distexec.bench._standalone import dxb_echo

ROOT = Path(__file__).resolve().parents[2]
QUICK_BACKENDS = ["raw_tcp", "raw_unix", "ppe"]


def _run_bench(*args: str, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "distexec.bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        check=False,
    )


@pytest.mark.timeout(120)
def test_quick_latency_json_is_complete_and_consistent() -> None:
    proc = _run_bench(
        "--quick", "--cases", "latency", "--backends", ",".join(QUICK_BACKENDS), "--json"
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)

    assert doc["schema"] == "distexec.bench/1"
    assert doc["settings"]["backends"] == QUICK_BACKENDS
    reps = doc["settings"]["reps"]
    assert reps >= 1
    assert doc["reaped"] == []
    case = doc["cases"]["latency"]
    assert case["reference"] == "ppe"
    assert case["floor"] in ("raw_tcp", "raw_unix")
    assert {m["key"] for m in case["metrics"]} >= {"median_us", "p99_us", "calls_per_s"}

    for name in QUICK_BACKENDS:
        entry = case["backends"][name]
        assert "error" not in entry, entry.get("runs")
        assert entry["reps_ok"] == entry["reps"] == reps
        for key in ("median_us", "p99_us", "calls_per_s"):
            stat = entry["summary"][key]
            assert stat["n"] == reps
            assert 0 < stat["min"] <= stat["median"] <= stat["max"]
        assert entry["summary"]["median_us"]["median"] <= entry["summary"]["p99_us"]["median"]
        # each repetition ran every backend once, in a rotated order
        assert [r["rep"] for r in entry["runs"]] == list(range(reps))
        assert all(r["ok"] and r["leftover"] == [] for r in entry["runs"])

    backends = case["backends"]
    ppe_self = backends["ppe"]["ratios"]["vs_ppe"]["median_us"]
    assert ppe_self["median"] == ppe_self["min"] == ppe_self["max"] == 1.0
    floor_self = backends[case["floor"]]["ratios"]["vs_floor"]["median_us"]
    assert floor_self["median"] == 1.0
    for name in QUICK_BACKENDS:
        for label, ref in (("vs_ppe", "ppe"), ("vs_floor", case["floor"])):
            per_rep = backends[name]["ratios"][label]["median_us"]["per_rep"]
            expected = [
                mine["metrics"]["median_us"] / theirs["metrics"]["median_us"]
                for mine, theirs in zip(backends[name]["runs"], backends[ref]["runs"], strict=True)
            ]
            assert per_rep == pytest.approx(expected)
    positions = {
        rep: [backends[b]["runs"][rep]["position"] for b in QUICK_BACKENDS] for rep in range(reps)
    }
    assert positions[0] == [0, 1, 2]
    if reps > 1:
        assert positions[1] == [2, 0, 1]
    markers = [r["marker"] for b in QUICK_BACKENDS for r in backends[b]["runs"]]
    assert all(_procs.carrying(MARKER_ENV, m) == [] for m in markers)


@pytest.mark.timeout(150)
def test_quick_main_cases_call_a_function_of_the_drivers_main() -> None:
    peers = ["ppe", "distexec", "distexec_executor"]
    if importlib.util.find_spec("loky") is not None:
        peers.append("loky")
    backends = ["raw_unix", *peers]
    cases = ["latency_main", "throughput_unbatched_main"]
    proc = _run_bench(
        "--quick", "--reps", "1", "--cases", ",".join(cases), "--backends", ",".join(backends),
        "--json", timeout=140,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["reaped"] == []
    for name in cases:
        case = doc["cases"][name]
        assert case["reference"] == "ppe"
        assert case["floor"] == "raw_unix"
        for b in backends:
            entry = case["backends"][b]
            assert entry["reps_ok"] == 1, entry["runs"]
            [run] = entry["runs"]
            # the libraries get the driver's __main__ function; the floor keeps its own
            want = "dxb_tasks.identity" if b == "raw_unix" else "__main__.main_identity"
            assert run["info"]["function"] == want, (name, b)
            assert all(v > 0 for v in run["metrics"].values())
        assert case["backends"]["ppe"]["runs"][0]["info"]["start_method"]
    text = render(doc)
    assert "## latency_main:" in text
    assert "identity defined in __main__" in text


def test_main_function_is_only_a_function_of_main(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under pytest, __main__ is pytest's: no main_identity there.
    with pytest.raises(RuntimeError, match="not a function of __main__"):
        main_function()
    # The driver imported under its own name: its main_identity is importable, not __main__'s.
    fake_main = types.ModuleType("__main__")
    fake_main.main_identity = bench_driver.main_identity  # type: ignore[attr-defined]
    assert bench_driver.main_identity.__module__ == "distexec.bench._driver"
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    with pytest.raises(RuntimeError, match=r"is distexec\.bench\._driver\.main_identity, not a"):
        main_function()
    # A top-level def of a script run as __main__ is what the *_main cases call.
    script = types.ModuleType("__main__")
    exec("def main_identity(x):\n    return x\n", script.__dict__)
    monkeypatch.setitem(sys.modules, "__main__", script)
    fn = main_function()
    assert fn.__module__ == "__main__"
    assert fn(3) == 3


@pytest.mark.timeout(120)
def test_quick_caching_pool_ships_the_closure_once_per_worker() -> None:
    pytest.importorskip("numpy")
    proc = _run_bench(
        "--quick", "--reps", "1", "--cases", "caching_pool", "--backends", "ppe,distexec", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["reaped"] == []
    case = doc["cases"]["caching_pool"]
    assert case["backends"]["ppe"]["error"].startswith("n/a")
    entry = case["backends"]["distexec"]
    assert entry["reps_ok"] == 1, entry["runs"]
    [run] = entry["runs"]
    assert run["leftover"] == []
    m, params = run["metrics"], case["params"]
    assert m["crossings"] == params["workers"] == 2
    # the array once to each worker, and little else: the warm calls carry no array
    assert 2 * params["array_bytes"] <= m["cold_MB"] * 1e6 < 2 * params["array_bytes"] + 1e6
    assert all(b["warm_b"] < 1e6 for b in run["info"]["bytes_sent"])
    for key in ("cold_ms", "warm_ms", "ship_ms", "plain_ms", "cold_ratio", "warm_ratio"):
        assert m[key] > 0
    assert m["cold_ratio"] == pytest.approx(
        statistics.median(r["cold"] / (r["ship"] + r["plain"]) for r in run["info"]["rounds_ms"])
    )
    assert "closure crossings" in render(doc)


@pytest.mark.timeout(60)
def test_text_table_names_backends_and_ratios() -> None:
    proc = _run_bench(
        "--quick", "--reps", "1", "--cases", "startup", "--backends", "raw_unix", "--quiet"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "## startup:" in proc.stdout
    assert "| raw_unix" in proc.stdout
    assert "÷ raw_unix" in proc.stdout
    assert "Floor: raw_unix" in proc.stdout


def test_rejects_unknown_backend(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--backends", "raw_tcp,nope"])
    assert exc.value.code == 2
    assert "unknown backend: nope" in capsys.readouterr().err


def test_rotated_orders() -> None:
    assert [rotated("abc", k) for k in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]


def _ok(rep: int, **metrics: float) -> dict[str, Any]:
    return {"ok": True, "metrics": metrics, "info": {}, "rep": rep, "leftover": [], "reaped": []}


def _err(rep: int, msg: str) -> dict[str, Any]:
    return {"ok": False, "error": msg, "rep": rep, "leftover": [], "reaped": []}


def test_summary_ratios_are_per_repetition_then_median() -> None:
    case = CASES["throughput_unbatched"]
    params = case.params(Settings(quick=True))
    runs = {
        "raw_tcp": [_ok(0, items_per_s=400.0), _ok(1, items_per_s=100.0)],
        "raw_unix": [_ok(0, items_per_s=300.0), _ok(1, items_per_s=300.0)],
        "ppe": [_ok(0, items_per_s=100.0), _ok(1, items_per_s=50.0)],
        "distexec": [_err(0, "AttributeError: no pmap"), _err(1, "AttributeError: no pmap")],
        "loky": [_ok(0, items_per_s=200.0), _err(1, "RuntimeError: flaky")],
    }
    s = summarize(case, params, list(runs), runs)
    b = s["backends"]
    assert s["floor"] == "raw_unix"  # best median: 300 against raw_tcp's 250
    assert b["ppe"]["ratios"]["vs_ppe"]["items_per_s"]["median"] == 1.0
    # time ratios: ppe 100/400 in repetition 0, 50/100 in repetition 1
    tcp = b["raw_tcp"]["ratios"]["vs_ppe"]["items_per_s"]
    assert tcp["per_rep"] == [0.25, 0.5]
    assert tcp["median"] == pytest.approx(0.375)
    assert b["ppe"]["ratios"]["vs_floor"]["items_per_s"]["per_rep"] == [3.0, 6.0]
    assert b["distexec"]["error"] == "AttributeError: no pmap"
    assert "summary" not in b["distexec"]
    assert b["distexec"]["ratios"]["vs_ppe"] == {}
    loky = b["loky"]
    assert loky["reps_ok"] == 1
    assert "error" not in loky
    assert loky["errors"] == ["RuntimeError: flaky"]
    assert loky["ratios"]["vs_ppe"]["items_per_s"]["per_rep"] == [0.5, None]

    text = render(
        {
            "settings": {"reps": 2, "quick": True},
            "machine": {
                "python": "3.11",
                "platform": "test",
                "usable_cpus": 2,
                "cpus": 2,
                "start_method": "fork",
                "load1_before": 0.0,
            },
            "cases": {"throughput_unbatched": s},
        }
    )
    assert "| distexec | 0/2  | error: AttributeError: no pmap |" in text
    assert "loky: error: RuntimeError: flaky" in text
    assert "Floor: raw_unix" in text


def test_throughput_reports_the_chunk_size_that_won_most_often() -> None:
    case = CASES["throughput"]
    params = case.params(Settings(quick=True))
    runs = {
        "ppe": [
            _ok(0, best_items_per_s=10.0, best_chunksize=1000),
            _ok(1, best_items_per_s=12.0, best_chunksize=5000),
            _ok(2, best_items_per_s=11.0, best_chunksize=1000),
        ]
    }
    s = summarize(case, params, ["ppe"], runs)
    assert s["floor"] is None
    assert s["backends"]["ppe"]["summary"]["best_chunksize"]["mode"] == 1000
    assert s["backends"]["ppe"]["summary"]["best_items_per_s"]["median"] == 11.0


@pytest.mark.timeout(30)
def test_raw_chan_carries_small_large_and_out_of_band_messages() -> None:
    np = pytest.importorskip("numpy")
    a, b = socket.socketpair()
    left, right = dxb_echo.Chan(a), dxb_echo.Chan(b)
    big_list = list(range(100_000))  # body larger than the staging buffer
    array = np.arange(1_000_000, dtype=np.float64)  # 8 MB: out of band, huge-page buffer
    messages: list[Any] = [1, "x" * 10, big_list, array, (2, array[:10]), None]

    def echo() -> None:
        for _ in messages:
            right.send(right.recv())

    peer = threading.Thread(target=echo)
    peer.start()
    try:
        for msg in messages:
            left.send(msg)
            back: Any = left.recv()
            if isinstance(msg, np.ndarray):
                assert np.array_equal(back, msg)
                assert back.flags.writeable
            elif isinstance(msg, tuple):
                assert back[0] == msg[0]
                assert np.array_equal(back[1], msg[1])
            else:
                assert back == msg
    finally:
        peer.join(timeout=20)
        left.close()
        right.close()
    assert not peer.is_alive()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["raw_tcp", "raw_unix"])
def test_raw_floor_maps_every_chunk_size_without_deadlock(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))  # prepare() adds _standalone to it
    backend = BACKENDS[name]()
    backend.prepare()
    backend.start(2)
    try:
        pids = backend.ping_all()
        assert len(set(pids)) == 2
        items = list(range(200_000))
        for chunksize in (1, 1000, 5000, 25_000, 100_000):
            n = 2000 if chunksize == 1 else len(items)
            assert backend.map(backend.tasks.identity, items[:n], chunksize) == items[:n]
        assert backend.call(backend.tasks.identity, "x") == "x"
    finally:
        backend.stop()
        backend.stop()  # idempotent
    assert not any(p.is_running() for p in map(_proc_or_none, pids) if p is not None)


def _proc_or_none(pid: int) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
    return None if proc.status() == psutil.STATUS_ZOMBIE else proc


class _FailingBackend(Backend):
    """Starts nothing and fails on the first call, as an unfinished backend would."""

    name = "failing"
    kind = "distexec"
    description = "test double"
    import_stmt = "pass"
    stopped = 0

    def start(self, nworkers: int) -> None:
        self.nworkers = nworkers

    def ping_all(self) -> list[int]:
        return [os.getpid()]

    def call(self, fn: Any, arg: Any) -> Any:
        raise NotImplementedError("remotecall_fetch is not there yet")

    def map(self, fn: Any, items: Any, chunksize: int) -> list[Any]:
        raise NotImplementedError

    def stop(self) -> None:
        type(self).stopped += 1


def test_driver_reports_a_failing_backend_as_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(BACKENDS, "failing", _FailingBackend)
    params = CASES["latency"].params(Settings(quick=True))
    # A process that was ours before the measurement (here: a test's) is not the driver's
    # to end: only what the measured backend left behind is.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        result = run_driver_in_process("latency", "failing", params)
        assert bystander.poll() is None, "the driver ended a process it did not start"
        assert bystander.pid not in [r["pid"] for r in result["leftover"]]
    finally:
        bystander.kill()
        bystander.wait()
    assert result["ok"] is False
    assert result["error"] == "NotImplementedError: remotecall_fetch is not there yet"
    assert "metrics" not in result
    assert _FailingBackend.stopped == 1
    assert run_driver_in_process("no-such-case", "failing", params)["error"].startswith("n/a")
    # In-process, __main__ is pytest's: the __main__ case refuses before any call.
    main_case = run_driver_in_process("latency_main", "failing", params)
    assert main_case["ok"] is False
    assert main_case["error"].startswith("RuntimeError: __main__.main_identity is None")


@pytest.mark.timeout(30)
def test_reap_ends_processes_that_carry_the_marker() -> None:
    marker = "test-" + os.urandom(8).hex()
    env = {**os.environ, MARKER_ENV: marker}
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:
        wait_until(lambda: _procs.carrying(MARKER_ENV, marker) == [proc.pid], timeout=10)
        reaped = reap(marker)
        assert [r["pid"] for r in reaped] == [proc.pid]
        assert proc.wait(timeout=10) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

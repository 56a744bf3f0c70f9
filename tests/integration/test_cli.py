"""The ``distexec`` command, run as a new user would: ``-p 2 script.py``, -c, -m, a prompt."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
from helpers import wait_until

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import distexec as dx
    from distexec._macros import everywhere, fetchfrom

    def square(x):  # defined in the script's __main__: it travels by value
        return x * x

    print("argv", sys.argv[1:])
    print("nworkers", dx.nworkers())
    print("remotecall", dx.remotecall_fetch(square, dx.workers()[0], 7))

    @everywhere
    def whoami():
        return dx.myid()

    import __main__
    print("everywhere", [fetchfrom(w, lambda: __main__.whoami()) for w in dx.workers()])
    print("ospids", *[dx.remotecall_fetch(os.getpid, w) for w in dx.workers()])
    if len(sys.argv) > 1 and sys.argv[1] == "exit":
        sys.exit(int(sys.argv[2]))
    if len(sys.argv) > 1 and sys.argv[1] == "raise":
        raise LookupError("the script failed")
    """
)


def _env(tmp_path: Path) -> dict[str, str]:
    path = os.pathsep.join([str(REPO), str(tmp_path), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path)


def run_distexec(
    args: list[str], tmp_path: Path, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distexec", *args],
        capture_output=True,
        text=True,
        input=stdin,
        env=_env(tmp_path),
        cwd=tmp_path,
        timeout=timeout,
    )


def _ospids(stdout: str) -> list[int]:
    for line in stdout.splitlines():
        if line.startswith("ospids"):
            return [int(x) for x in line.split()[1:]]
    return []


def assert_gone(ospids: list[int]) -> None:
    def gone() -> bool:
        for pid in ospids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                pass
        return True

    wait_until(gone, timeout=15, what=f"worker processes {ospids} to exit")


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    return path


def test_p2_script_runs_with_workers_and_removes_them(script: Path, tmp_path: Path) -> None:
    res = run_distexec(["-p", "2", str(script), "a", "--flag"], tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "argv ['a', '--flag']" in out  # the script's options are not distexec's
    assert "nworkers 2" in out
    assert "remotecall 49" in out
    assert "everywhere [2, 3]" in out
    ospids = _ospids(out)
    assert len(ospids) == 2
    assert_gone(ospids)


@pytest.mark.parametrize(
    ("args", "code", "in_stderr"),
    [
        (["exit", "3"], 3, ""),
        (["exit", "0"], 0, ""),
        (["raise"], 1, "LookupError: the script failed"),
    ],
)
def test_exit_status_is_the_scripts_and_workers_go_anyway(
    script: Path, tmp_path: Path, args: list[str], code: int, in_stderr: str
) -> None:
    res = run_distexec(["-p", "1", str(script), *args], tmp_path)
    assert res.returncode == code, res.stderr
    assert in_stderr in res.stderr
    if in_stderr:  # a traceback like python's: the script's frames, not runpy's or ours
        assert 'script.py", line' in res.stderr
        assert "runpy" not in res.stderr and "_cli.py" not in res.stderr
    assert_gone(_ospids(res.stdout))


def test_options_after_the_script_are_the_scripts(script: Path, tmp_path: Path) -> None:
    res = run_distexec(["-p", "1", str(script), "-p", "5", "--help"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "argv ['-p', '5', '--help']" in res.stdout
    assert "nworkers 1" in res.stdout


def test_c_code_and_its_arguments(tmp_path: Path) -> None:
    code = "import sys, distexec as dx; print(dx.nworkers(), dx.workers(), sys.argv)"
    res = run_distexec(["-p", "2", "-c", code, "x", "-p", "9"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "2 [2, 3] ['-c', 'x', '-p', '9']"


def test_m_module(tmp_path: Path) -> None:
    (tmp_path / "mymod.py").write_text(
        "import sys, distexec as dx\nprint('module', __name__, dx.nworkers(), sys.argv[1:])\n"
    )
    res = run_distexec(["-p", "1", "-m", "mymod", "--opt"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "module __main__ 1 ['--opt']" in res.stdout


def test_interactive_prompt_has_workers_ready(tmp_path: Path) -> None:
    res = run_distexec(["-p", "2"], tmp_path, stdin="print('seen', dx.workers())\n")
    assert res.returncode == 0, res.stderr
    assert "seen [2, 3]" in res.stdout
    assert "2 workers [2, 3]" in res.stderr  # the banner


def test_script_without_workers(script: Path, tmp_path: Path) -> None:
    res = run_distexec(["-c", "import distexec as dx; print(dx.workers())"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[1]"


BAD_COMMAND_LINES = [
    (["-p", "two", "x.py"], "expected a number of workers or 'auto'"),
    (["-p", "-1", "x.py"], "cannot be negative"),
    (["missing_script.py"], "can't open file"),
    (["-p", "1", "-c"], "expected one argument"),
    (["--no-such-option", "x.py"], "unrecognized arguments: --no-such-option"),
]


@pytest.mark.parametrize(("args", "message"), BAD_COMMAND_LINES)
def test_bad_command_lines(tmp_path: Path, args: list[str], message: str) -> None:
    res = run_distexec(args, tmp_path)
    assert res.returncode == 2
    assert message in res.stderr


def _has_machine_file_loader() -> bool:
    import importlib

    for name in ("distexec._machinefile", "distexec.managers.ssh"):
        try:
            if hasattr(importlib.import_module(name), "load_machine_file"):
                return True
        except ImportError:
            continue
    return False


def test_machine_file_errors_are_reported_before_any_worker_starts(
    script: Path, tmp_path: Path
) -> None:
    if not _has_machine_file_loader():
        (tmp_path / "hosts.txt").write_text("localhost\n")
        res = run_distexec(["--machine-file", "hosts.txt", str(script)], tmp_path)
        assert res.returncode == 2
        assert "--machine-file is not available" in res.stderr
        return
    res = run_distexec(["--machine-file", "no_such_hosts.txt", str(script)], tmp_path)
    assert res.returncode == 2
    assert "--machine-file:" in res.stderr and "no_such_hosts.txt" in res.stderr
    (tmp_path / "bad_hosts.txt").write_text("# a comment\nx*host\n")
    res = run_distexec(["-p", "1", "--machine-file", "bad_hosts.txt", str(script)], tmp_path)
    assert res.returncode == 2
    assert "bad_hosts.txt:2" in res.stderr
    assert "nworkers" not in res.stdout  # the script did not run


def test_no_arguments_runs_the_demo(tmp_path: Path) -> None:
    res = run_distexec([], tmp_path)
    try:
        import distexec._demo  # noqa: F401
    except ModuleNotFoundError:
        assert res.returncode == 1
        assert "the demo is not available" in res.stderr
    else:
        assert res.returncode == 0, res.stderr


def _help_examples(help_text: str) -> list[str]:
    lines = help_text.split("examples:", 1)[1].splitlines()
    return [ln.strip() for ln in lines if re.match(r"\s{2}distexec\b", ln)]


def test_help_documents_everything(tmp_path: Path) -> None:
    res = run_distexec(["--help"], tmp_path)
    assert res.returncode == 0
    for needle in ("-p N", "--machine-file", "-c CODE", "-m MODULE", "script.py", "examples:"):
        assert needle in res.stdout
    assert len(_help_examples(res.stdout)) >= 6


def test_help_examples_run(script: Path, tmp_path: Path) -> None:
    """Every example of ``--help`` runs, with script.py, mypackage.tool and hosts.txt made real."""
    help_text = run_distexec(["--help"], tmp_path).stdout
    pkg = tmp_path / "mypackage"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tool.py").write_text("import distexec as dx\nprint('tool', dx.nworkers())\n")
    ran = 0
    for example in _help_examples(help_text):
        argv = shlex.split(example)[1:]
        if "--machine-file" in argv:
            continue  # needs ssh hosts: the ssh tests cover it; errors are tested above
        if not argv:
            continue  # the demo: test_no_arguments_runs_the_demo
        if argv == ["-p", "auto", "script.py"]:
            argv = ["-p", "2", "script.py"]  # the same path, without one worker per CPU
        stdin = "print('prompt', dx.nworkers())\n" if argv == ["-p", "2"] else None
        res = run_distexec(argv, tmp_path, stdin=stdin)
        assert res.returncode == 0, (example, res.stderr)
        assert res.stdout.strip(), example
        ran += 1
    assert ran >= 5


def test_p_auto_starts_one_worker_per_cpu(tmp_path: Path) -> None:
    from loky import cpu_count

    n = int(cpu_count())
    if n > 8:
        pytest.skip(f"{n} CPUs: too many workers for a quick test")
    res = run_distexec(
        ["-p", "auto", "-c", "import distexec as dx; print(dx.nworkers())"], tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(n)


def test_console_script_is_installed(tmp_path: Path) -> None:
    exe = shutil.which("distexec")
    if exe is None:
        pytest.skip("the distexec console script is not on PATH (package not installed)")
    res = subprocess.run(
        [exe, "-p", "1", "-c", "import distexec as dx; print(dx.workers())"],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[2]"

"""The ``distexec`` command (also ``python -m distexec``): Julia's ``julia -p N script.jl``.

Layer: entry point. Imports: distexec's public API; nothing imports it but ``__main__``.

Starts the workers, runs a script, ``-c`` code, a ``-m`` module or an interactive prompt as
``__main__`` with them in place, and removes them at the end, also when the program fails.
With no arguments at all it runs the demo.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback
import types
from collections.abc import Callable, Sequence
from typing import Any

PROG = "distexec"

EXAMPLES = """\
examples:
  distexec
      run the demo (the same as: python -m distexec)
  distexec -p 2 script.py arg1 arg2
      start 2 local workers, run script.py as __main__ with sys.argv = [script.py, arg1, arg2]
  distexec -p auto script.py
      one worker per CPU this process may use
  distexec -p 2 -c "import distexec as dx; print(dx.nworkers(), dx.workers())"
      run a line of code with 2 workers
  distexec -p 2 -m mypackage.tool --verbose
      run a module as __main__, as python -m does
  distexec --machine-file hosts.txt script.py
      workers on the machines listed in hosts.txt (one "[count*][user@]host[:port]" a line)
  distexec -p 2
      an interactive prompt with 2 workers ready and distexec imported as dx

The workers are removed when the program ends, also when it fails or is interrupted.
The exit status is the program's: sys.exit(n) gives n, an uncaught exception gives 1.
"""


def _nprocs(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of workers or 'auto', not {value!r}"
        ) from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"the number of workers cannot be negative ({n})")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (separate so tests and docs can inspect it)."""
    from ._version import __version__

    ap = argparse.ArgumentParser(
        prog=PROG,
        usage="%(prog)s [-p N|auto] [--machine-file FILE] "
        "[-c CODE | -m MODULE | script.py] [args ...]",
        description="Run a Python program with distexec workers in place, as Julia's "
        "`julia -p N script.jl` does. Without a program: an interactive prompt; with no "
        "arguments at all: the demo.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "-p",
        "--procs",
        type=_nprocs,
        default=0,
        metavar="N",
        help="start N local workers first ('auto': one per usable CPU)",
    )
    ap.add_argument(
        "--machine-file",
        metavar="FILE",
        help="start workers on the machines listed in FILE (over ssh)",
    )
    ap.add_argument("-c", dest="code", metavar="CODE", help="run CODE as __main__")
    ap.add_argument("-m", dest="module", metavar="MODULE", help="run MODULE as __main__")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    ap.add_argument(
        "argv",
        nargs="*",
        metavar="script.py [args ...]",
        help="the script and its arguments (after -c CODE or -m MODULE: their arguments); "
        "distexec's own options go before it",
    )
    return ap


_OPTS_WITH_VALUE = ("-p", "--procs", "--machine-file")


def split_command_line(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split *argv* into distexec's options and the program's part, as ``python`` does.

    distexec's options come first; the program starts at ``-c CODE``/``-m MODULE`` (whose
    arguments follow) or at the first argument that is not an option (the script). So
    ``distexec -p 2 script.py -p 5`` gives ``-p 5`` to the script.
    """
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-c", "-m"):
            return list(argv[: i + 2]), list(argv[i + 2 :])
        if arg.startswith(("-c", "-m")) and not arg.startswith("--"):
            return list(argv[: i + 1]), list(argv[i + 1 :])  # -cCODE, -mMODULE
        if arg == "--":
            return list(argv[:i]), list(argv[i + 1 :])
        if arg in _OPTS_WITH_VALUE:
            i += 2
        elif arg.startswith("-") and arg != "-":
            i += 1  # -pN, --procs=N, -h, --version, or a mistake argparse will report
        else:
            return list(argv[:i]), list(argv[i:])
    return list(argv), []


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``distexec`` command; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list:
        return _run_demo()
    ap = build_parser()
    ours, program = split_command_line(args_list)
    args = ap.parse_args(ours)

    if args.code is not None:
        mode, target, prog_args = "code", args.code, program
    elif args.module is not None:
        mode, target, prog_args = "module", args.module, program
    elif program:
        mode, target, prog_args = "script", program[0], program[1:]
        if not os.path.exists(target):
            print(f"{PROG}: can't open file {target!r}: no such file", file=sys.stderr)
            return 2
    else:
        mode, target, prog_args = "interactive", "", []

    machines: list[Any] = []
    if args.machine_file is not None:
        loader = _machine_file_loader()
        if loader is None:
            print(
                f"{PROG}: --machine-file is not available in this build yet "
                "(no load_machine_file in distexec._machinefile or distexec.managers.ssh)",
                file=sys.stderr,
            )
            return 2
        try:
            machines = list(loader(args.machine_file))
        except (OSError, ValueError) as exc:
            print(f"{PROG}: --machine-file: {exc}", file=sys.stderr)
            return 2

    # Workers inherit sys.path when they start, so the program's folder goes in first.
    first = os.path.dirname(os.path.abspath(target)) if mode == "script" else os.getcwd()
    if first not in sys.path:
        sys.path.insert(0, first)

    import distexec as dx

    try:
        try:
            if args.procs == "auto":
                dx.addprocs()
            elif args.procs:
                dx.addprocs(args.procs)
            if machines:
                dx.addprocs(machines)
        except (dx.DistexecError, OSError, ValueError) as exc:
            print(f"{PROG}: could not start the workers: {exc}", file=sys.stderr)
            return 1
        if mode == "interactive":
            return _interact(dx)
        return _run_program(mode, target, prog_args)
    finally:
        _remove_workers(dx)


def _machine_file_loader() -> Callable[[str], Any] | None:
    import importlib

    for modname in ("distexec._machinefile", "distexec.managers.ssh"):
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        fn = getattr(mod, "load_machine_file", None)
        if callable(fn):
            return fn  # type: ignore[no-any-return]
    return None


def _run_demo() -> int:
    try:
        from ._demo import main as demo
    except ModuleNotFoundError as exc:
        if exc.name not in ("distexec._demo", f"{__package__}._demo"):
            raise
        print(
            f"{PROG}: the demo is not available in this build (distexec._demo is missing).\n"
            f'Try: {PROG} -p 2 -c "import distexec as dx; print(dx.workers())"; '
            f"see {PROG} --help.",
            file=sys.stderr,
        )
        return 1
    return int(demo() or 0)


def _remove_workers(dx: Any) -> None:
    try:
        if dx.myid() != 1:
            return
        live = [p for p in dx.workers() if p != 1]
        if live:
            dx.rmprocs(live)
    except Exception as exc:  # pragma: no cover - the atexit hook tries again
        print(f"{PROG}: removing the workers failed: {exc}", file=sys.stderr)


def _exit_status(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _print_user_traceback(exc: BaseException) -> None:
    """Print *exc* as Python would for a script: without this module's and runpy's frames."""
    ours = {os.path.abspath(__file__), os.path.abspath(runpy.__file__), "<frozen runpy>"}
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename not in ours and os.path.abspath(filename) not in ours:
            break
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)


def _run_program(mode: str, target: str, prog_args: list[str]) -> int:
    saved_argv = sys.argv
    try:
        if mode == "script":
            sys.argv = [target, *prog_args]
            runpy.run_path(target, run_name="__main__")
        elif mode == "module":
            sys.argv = [target, *prog_args]  # runpy puts the module's path in argv[0]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", *prog_args]
            _run_code(target)
    except SystemExit as exc:
        return _exit_status(exc)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        _print_user_traceback(exc)
        return 1
    finally:
        sys.argv = saved_argv
        _flush()
    return 0


def _fresh_main() -> types.ModuleType:
    mod = types.ModuleType("__main__")
    mod.__dict__["__builtins__"] = __builtins__
    return mod


def _run_code(code: str) -> None:
    import linecache

    filename = "<distexec -c>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    compiled = compile(code, filename, "exec")
    mod = _fresh_main()
    saved = sys.modules["__main__"]
    sys.modules["__main__"] = mod
    try:
        exec(compiled, mod.__dict__)
    finally:
        sys.modules["__main__"] = saved


def _interact(dx: Any) -> int:
    import code

    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  - line editing and history for input()
            import rlcompleter  # noqa: F401
        except ImportError:  # pragma: no cover
            pass
    mod = _fresh_main()
    mod.__dict__["dx"] = dx
    banner = (
        f"distexec {dx.__version__}, Python {sys.version.split()[0]}: "
        f"{dx.nprocs() - 1} workers {[p for p in dx.procs() if p != 1]}; "
        "distexec is imported as dx. Ctrl-D quits and removes the workers."
    )
    saved = sys.modules["__main__"]
    sys.modules["__main__"] = mod
    try:
        code.interact(banner=banner, local=mod.__dict__, exitmsg="")
    except SystemExit as exc:
        return _exit_status(exc)
    finally:
        sys.modules["__main__"] = saved
        _flush()
    return 0


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass

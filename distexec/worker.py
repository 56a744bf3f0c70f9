"""The worker process: ``python -m distexec.worker`` (also the ``distexec-worker`` command).

Layer: entry point. Imports: L0-L6; nothing imports it.

Reads the cluster cookie from stdin (never from the command line), listens (127.0.0.1 by
default), prints one ``distexec-worker HOST:PORT`` line, and serves the master. It exits on
its own when the master has not connected within ``DISTEXEC_WORKER_TIMEOUT`` seconds, when
the master's connection drops, when stdin reaches EOF (the master or the ssh session died),
or when asked to.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import ipaddress
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import types
from typing import NoReturn

from . import _config


def _apply_sys_path() -> None:
    extra = os.environ.get("DISTEXEC_SYS_PATH")
    if not extra:
        return
    try:
        paths = json.loads(extra)
    except ValueError:
        return
    for p in paths:
        if isinstance(p, str) and p not in sys.path:
            sys.path.append(p)
    # The master's first entry (its script's folder or '') matters most: put it first.
    if paths and isinstance(paths[0], str) and paths[0] in sys.path:
        sys.path.remove(paths[0])
        sys.path.insert(0, paths[0])


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when our parent (the master) dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _watch_stdin(stop: threading.Event) -> None:
    try:
        while sys.stdin.buffer.read1(4096):
            pass
    except (OSError, ValueError):
        pass
    stop.set()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="distexec-worker",
        description="A distexec worker. The cluster cookie is read from stdin "
        "(or from --cookie-file); it never goes on the command line.",
    )
    ap.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (default: any free one)")
    ap.add_argument(
        "--cookie-file", help="read the cookie from this file (mode 600) instead of stdin"
    )
    ap.add_argument(
        "--parent-death",
        action="store_true",
        help="exit when the parent process dies (local workers)",
    )
    ap.add_argument(
        "--unix",
        action="store_true",
        help="also listen on an AF_UNIX socket in a private directory (local workers)",
    )
    ap.add_argument(
        "--allow-insecure-network",
        action="store_true",
        help="allow listening on a non-loopback address without TLS",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> NoReturn:
    """Run a worker until the master lets it go; never returns."""
    args = parse_args(argv)
    if args.parent_death:
        _die_with_parent()
    faulthandler.enable()
    _apply_sys_path()
    if args.cookie_file:
        st = os.stat(args.cookie_file)
        if st.st_mode & 0o077:
            print(
                f"distexec-worker: {args.cookie_file} is readable by others; chmod 600 it",
                file=sys.stderr,
            )
            os._exit(2)
        with open(args.cookie_file, "rb") as fh:
            cookie = fh.readline().strip()
        watch_stdin = False
    else:
        cookie = sys.stdin.buffer.readline().strip()
        watch_stdin = True
    if not cookie:
        print("distexec-worker: no cookie on stdin", file=sys.stderr)
        os._exit(2)
    allow_insecure = (
        args.allow_insecure_network or os.environ.get("DISTEXEC_ALLOW_INSECURE_NETWORK") == "1"
    )
    if not _is_loopback(args.bind) and not allow_insecure:
        print(
            f"distexec-worker: refusing to listen on {args.bind} without TLS; "
            "pass --allow-insecure-network to do it anyway",
            file=sys.stderr,
        )
        os._exit(2)

    # Listen and report before importing distexec proper: the master dials while we import,
    # and the kernel's backlog holds its connection until the accept loop starts.
    family = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
    sock = socket.create_server((args.bind, args.port), family=family, backlog=128)
    host, port = args.bind, sock.getsockname()[1]
    banner = f"distexec-worker {host}:{port}"
    unix_sock = None
    if args.unix:
        # A private directory (mode 700) holds the socket; the cookie still guards it.
        unix_dir = tempfile.mkdtemp(prefix="distexec-w")
        unix_path = os.path.join(unix_dir, "s")
        unix_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix_sock.bind(unix_path)
        unix_sock.listen(128)
        banner += f" unix={unix_path}"
        _cleanup.append(unix_dir)
    sys.stdout.write(banner + "\n")
    sys.stdout.flush()

    # User code gets a clean __main__ (Julia's Main), not this module: `python -m` made
    # distexec.worker the __main__ module, and functions shipped from the master's __main__
    # (and @everywhere definitions) must not meet our own main(), os or sys there.
    sys.modules["__main__"] = types.ModuleType("__main__")

    import distexec  # noqa: F401  - wires the runtime (refs, pools) before anything arrives

    from . import _cluster, _interrupt

    g = _cluster.group()
    g.set_cookie(cookie)
    _interrupt.install_worker_handler()
    g.serve(sock, (host, port))
    if unix_sock is not None:
        g.serve_also(unix_sock)
    if watch_stdin:
        threading.Thread(
            target=_watch_stdin, args=(g.exit_requested,), name="distexec-stdin", daemon=True
        ).start()
    timeout = _config.worker_timeout()
    deadline = time.monotonic() + timeout
    while not g.joined.wait(0.05):
        if g.exit_requested.is_set():
            _shutdown(g)  # stdin closed before the master joined: nobody will come
        if time.monotonic() > deadline:
            print(
                f"distexec-worker: the master did not connect within {timeout:g} seconds; exiting",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)
    g.exit_requested.wait()
    _shutdown(g)


_cleanup: list[str] = []


def _shutdown(g: object) -> NoReturn:
    for path in _cleanup:
        shutil.rmtree(path, ignore_errors=True)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


if __name__ == "__main__":
    main()

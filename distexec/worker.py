"""The worker process: ``python -m distexec.worker`` (also the ``distexec-worker`` command).

Layer: entry point. Imports: L0-L6; nothing imports it.

Reads the cluster cookie from stdin (never from the command line), listens (127.0.0.1 by
default), prints one ``distexec-worker HOST:PORT`` line, and serves the master. It exits on
its own when the master has not connected within ``DISTEXEC_WORKER_TIMEOUT`` seconds, when
the master's connection drops, when stdin reaches EOF (the master or the ssh session died),
or when asked to.
"""

from __future__ import annotations

import ctypes
import dataclasses
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
import types
from typing import TYPE_CHECKING, Any, NoReturn

from . import _config

if TYPE_CHECKING:
    import argparse

    #: What :func:`main` reads its options from: :func:`parse_args`'s namespace, or the
    #: one :func:`_quick_args` makes for a local worker's command line.
    Args = argparse.Namespace | types.SimpleNamespace


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
        stdin: Any = sys.stdin.buffer  # a BufferedReader when stdin is a pipe
        while stdin.read1(4096):
            pass
    except (OSError, ValueError):
        pass
    stop.set()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import argparse

    ap = argparse.ArgumentParser(
        prog="distexec-worker",
        description="A distexec worker. The cluster cookie is read from stdin "
        "(or from --cookie-file); it never goes on the command line.",
    )
    ap.add_argument(
        "--bind",
        default=None,
        help="address to listen on (default 127.0.0.1; with --join, the address this "
        "machine reaches pid 1 from)",
    )
    ap.add_argument("--port", type=int, default=0, help="port to listen on (default: any free one)")
    ap.add_argument(
        "--cookie-file", help="read the cookie from this file (mode 600) instead of stdin"
    )
    ap.add_argument(
        "--authkey-from-stdin",
        action="store_true",
        help="read the master's multiprocessing authkey (hex) from stdin after the cookie "
        "(local workers)",
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
    ap.add_argument(
        "--join",
        metavar="HOST:PORT",
        help="join the running cluster whose pid 1 listens there (an ElasticManager) "
        "instead of waiting to be dialled",
    )
    tls = ap.add_argument_group(
        "TLS",
        "mutual TLS 1.3 on every link (file paths; also DISTEXEC_TLS_CA, DISTEXEC_TLS_CERT, "
        "DISTEXEC_TLS_KEY, DISTEXEC_TLS_HOSTNAME, DISTEXEC_TLS_CHECK_HOSTNAME=0)",
    )
    tls.add_argument("--tls-ca", help="PEM file of the CA that signs the cluster's certificates")
    tls.add_argument("--tls-cert", help="PEM file with this worker's certificate chain")
    tls.add_argument("--tls-key", help="PEM file with its private key (if not in --tls-cert)")
    tls.add_argument("--tls-hostname", help="the name every peer's certificate must carry")
    tls.add_argument(
        "--tls-no-check-hostname",
        action="store_true",
        help="only check that peers' certificates come from the CA",
    )
    return ap.parse_args(argv)


#: Every option's default, as :func:`parse_args` gives it (a test keeps the two in step).
_DEFAULTS: dict[str, object] = {
    "bind": None,
    "port": 0,
    "cookie_file": None,
    "parent_death": False,
    "unix": False,
    "authkey_from_stdin": False,
    "allow_insecure_network": False,
    "join": None,
    "tls_ca": None,
    "tls_cert": None,
    "tls_key": None,
    "tls_hostname": None,
    "tls_no_check_hostname": False,
}
_QUICK_FLAGS = {
    "--parent-death": "parent_death",
    "--unix": "unix",
    "--authkey-from-stdin": "authkey_from_stdin",
}
_QUICK_VALUES = {"--bind": "bind"}


def _quick_args(argv: list[str]) -> types.SimpleNamespace | None:
    """The options of a command line made only of ``--bind ADDR``, ``--parent-death``,
    ``--unix`` and ``--authkey-from-stdin``, each at most once, spelled out (LocalManager's),
    read without argparse: importing it and building the parser cost about 3 ms of a local
    worker's start. ``None`` for any other command line, which :func:`parse_args` reads (and
    explains, if wrong)."""
    options = dict(_DEFAULTS)
    seen: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in seen:
            return None
        seen.add(arg)
        if arg in _QUICK_FLAGS:
            options[_QUICK_FLAGS[arg]] = True
            i += 1
        elif arg in _QUICK_VALUES and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            options[_QUICK_VALUES[arg]] = argv[i + 1]
            i += 2
        else:
            return None
    return types.SimpleNamespace(**options)


def _tls_config(args: Args) -> Any:
    """The TLSConfig from the command line or the environment (None: plain TCP), with its
    files loaded; exits with status 2 if they do not load."""
    if not (args.tls_ca or args.tls_cert or os.environ.get("DISTEXEC_TLS_CA")):
        return None
    from ._transport.tls import TLSConfig

    try:
        config: TLSConfig | None
        if args.tls_ca or args.tls_cert:
            config = TLSConfig(ca=args.tls_ca or "", cert=args.tls_cert or "", key=args.tls_key)
        else:
            config = TLSConfig.from_env(os.environ)
        assert config is not None
        if args.tls_hostname:
            config = dataclasses.replace(config, hostname=args.tls_hostname)
        if args.tls_no_check_hostname:
            config = dataclasses.replace(config, check_hostname=False)
        config.server_context()
        config.client_context()
    except (ValueError, TypeError) as exc:
        print(f"distexec-worker: {exc}", file=sys.stderr)
        os._exit(2)
    return config


def main(argv: list[str] | None = None) -> NoReturn:
    """Run a worker until the master lets it go; never returns."""
    args: Args | None = _quick_args(sys.argv[1:] if argv is None else argv)
    if args is None:
        args = parse_args(argv)
    if args.parent_death:
        _die_with_parent()
    # A crash (SIGSEGV, SIGABRT, ...) prints the crashing thread's stack to stderr, whose
    # tail the master keeps for WorkerDiedError.stderr_tail: that thread only, so the
    # report fits in the tail instead of being pushed out by idle threads' stacks.
    faulthandler.enable(all_threads=False)
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
        if args.authkey_from_stdin:
            try:
                _config.mp_authkey = bytes.fromhex(sys.stdin.buffer.readline().strip().decode())
            except ValueError:
                print("distexec-worker: a bad authkey line on stdin", file=sys.stderr)
                os._exit(2)
    if not cookie:
        print("distexec-worker: no cookie on stdin", file=sys.stderr)
        os._exit(2)
    allow_insecure = (
        args.allow_insecure_network or os.environ.get("DISTEXEC_ALLOW_INSECURE_NETWORK") == "1"
    )
    tls = _tls_config(args)
    if args.join:
        _join_cluster(args, cookie, tls, allow_insecure)
    bind = args.bind or "127.0.0.1"
    # Listen and report before importing distexec proper: the master dials while we import,
    # and the kernel's backlog holds its connection until the accept loop starts.
    sock = _listen(bind, args.port, allow_insecure, tls)
    host, port = bind, sock.getsockname()[1]
    banner = f"distexec-worker {host}:{port}"
    unix_sock = None
    if args.unix and tls is None:  # with TLS every link is TLS: no AF_UNIX shortcut
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
    g.serve(_listener(g, sock, tls), (host, port))
    if unix_sock is not None:
        g.serve_also(unix_sock)
    if watch_stdin:
        threading.Thread(
            target=_watch_stdin, args=(g.exit_requested,), name="distexec-stdin", daemon=True
        ).start()
    from ._custom import serve_until_released

    serve_until_released(g, _remove_private_dirs)  # stdin's EOF releases it too


_cleanup: list[str] = []


def _listen(bind: str, port: int, allow_insecure: bool, tls: Any) -> socket.socket:
    """A listening socket on *bind*; exits with status 2 for a non-loopback address without
    TLS unless insecure networking was allowed."""
    if not _is_loopback(bind) and not allow_insecure and tls is None:
        print(
            f"distexec-worker: refusing to listen on {bind} without TLS; "
            "give TLS files (--tls-ca/--tls-cert) or pass --allow-insecure-network",
            file=sys.stderr,
        )
        os._exit(2)
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    return socket.create_server((bind, port), family=family, backlog=128)


def _listener(g: Any, sock: socket.socket, tls: Any) -> Any:
    """*sock*, or with TLS a listener that hands out TLS streams (the cluster dials TLS too)."""
    if tls is None:
        return sock
    from ._transport.tls import TLSListener

    g.set_tls(tls)
    return TLSListener(sock, tls.server_context())


def _join_cluster(args: Args, cookie: bytes, tls: Any, allow: bool) -> NoReturn:
    """``--join HOST:PORT``: dial pid 1's ElasticManager, answer its challenge (it proves
    itself second, so a stranger's port learns nothing), tell it where we listen for the
    other workers, and serve until let go. The link to pid 1 is this worker's lifeline."""
    host, _, port_text = args.join.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit():
        print(f"distexec-worker: --join wants HOST:PORT, not {args.join!r}", file=sys.stderr)
        os._exit(2)
    timeout = _config.worker_timeout()
    try:
        raw = socket.create_connection((host, int(port_text)), timeout=timeout)
    except OSError as exc:
        print(f"distexec-worker: cannot reach pid 1 at {args.join}: {exc}", file=sys.stderr)
        os._exit(1)
    bind = args.bind or raw.getsockname()[0]
    sock = _listen(bind, args.port, allow, tls)
    address = (bind, sock.getsockname()[1])
    sys.modules["__main__"] = types.ModuleType("__main__")  # as in main(): a clean Main

    import distexec  # noqa: F401  - wires the runtime (refs, pools) before anything arrives

    from . import _cluster, _interrupt
    from ._transport import connection as _conn

    g = _cluster.group()
    g.set_cookie(cookie)
    _interrupt.install_worker_handler()
    g.serve(_listener(g, sock, tls), address)
    outcome: list[BaseException] = []
    done = threading.Event()

    def join() -> None:
        try:
            conn = _conn.authenticate(
                raw,
                cookie,
                {**g._hello(), "listen": list(address)},
                initiator=False,
                timeout=timeout,
                peer=f"pid 1 at {args.join}",
                ssl_context=None if tls is None else tls.client_context(),
                server_hostname=None if tls is None else tls.server_hostname(host),
            )
            g.serve_link(conn, join_only=True)
        except BaseException as exc:
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=join, name="distexec-join", daemon=True).start()
    if not done.wait(timeout) or outcome:
        why = (
            f"{type(outcome[0]).__name__}: {outcome[0]}"
            if outcome
            else f"pid 1 did not take us in within {timeout:g} seconds"
        )
        if outcome and "during the handshake" in str(outcome[0]):
            why += " (is the cookie right?)"
        print(f"distexec-worker: could not join {args.join}: {why}", file=sys.stderr, flush=True)
        os._exit(1)
    print(f"distexec-worker joined {args.join} as worker {g.myid}", flush=True)
    g.exit_requested.wait()
    from ._custom import exit_now

    exit_now(_remove_private_dirs)


def _remove_private_dirs() -> None:
    for path in _cleanup:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()

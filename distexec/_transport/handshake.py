"""Authenticate a fresh connection on the cluster cookie, then agree on versions.

Layer: L1 transport. Imports: stdlib, distexec.errors, distexec._version, framing, integrity.

Nothing is unpickled before both steps succeed. The exchange (fixed sizes, so a
stranger can make us allocate nothing)::

    initiator -> responder   MAGIC nonce_i                       (4 + 1 + 32 bytes)
    responder -> initiator   MAGIC nonce_r HMAC(k, "r" ni nr)    (4 + 1 + 32 + 32)
    initiator -> responder   HMAC(k, "i" nr ni)                  (32)
    both ways                u32 length + JSON hello             (≤ 4 KiB)

Both sides prove knowledge of the cookie ``k`` (mutual), digests are compared with
``hmac.compare_digest``, and the role labels keep one side's answer from being replayed as
the other's. Both sides keep the session key ``HMAC(k, "distexec-session" ni nr)``, from
which :mod:`integrity` derives the per-direction frame MAC keys.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any

from .. import _version
from ..errors import AuthenticationError, ProtocolError, VersionMismatchError
from . import integrity
from .framing import FrameReader

MAGIC = b"DXEC"
WIRE_VERSION = 1
_NONCE = 32
_MAC = 32
_HELLO_MAX = 4096
_U32 = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class PeerHello:
    """What the other side said about itself after authenticating."""

    versions: dict[str, str]
    info: dict[str, Any]
    session_key: bytes


def local_versions() -> dict[str, str]:
    """The versions two peers must share to talk."""
    return {
        "distexec": _version.__version__,
        "protocol": str(_version.PROTOCOL_VERSION),
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",  # (platform costs 1 ms)
        "cloudpickle": _cloudpickle_version(),
    }


_cloudpickle_version_seen = ""


def _cloudpickle_version() -> str:
    """``cloudpickle.__version__``, read once from its ``__init__.py`` rather than by
    importing it: importing costs a worker ~5 ms of its start, and many never need it. (Not
    from ``sys.modules`` either: another thread may be importing it right now, and a module
    half initialized has no ``__version__`` yet.)"""
    global _cloudpickle_version_seen
    if not _cloudpickle_version_seen:
        import importlib.util

        version = ""
        spec = importlib.util.find_spec("cloudpickle")
        if spec is not None and spec.origin and spec.origin.endswith("__init__.py"):
            try:
                with open(spec.origin, encoding="utf-8") as f:
                    for line in f:
                        if line.startswith("__version__ = "):
                            version = line.split("=", 1)[1].strip().strip("\"'")
                            break
            except OSError:
                pass
        if not version:  # an unusual layout: ask the module (an import waits for one under way)
            import cloudpickle

            version = cloudpickle.__version__
        _cloudpickle_version_seen = version
    return _cloudpickle_version_seen


def _mac(key: bytes, label: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(key, label + a + b, hashlib.sha256).digest()


def _check_versions(mine: dict[str, str], theirs: dict[str, str], peer: str) -> None:
    diffs = [
        f"{k} {mine.get(k)} here vs {theirs.get(k)} on {peer}"
        for k in ("protocol", "distexec", "python", "cloudpickle")
        if mine.get(k) != theirs.get(k)
    ]
    if diffs:
        raise VersionMismatchError(
            "cannot talk to " + peer + ": " + "; ".join(diffs) + ". Every process of a cluster "
            "must run the same distexec, Python (major.minor) and cloudpickle versions."
        )


def _exchange_hello(
    sock: socket.socket, reader: FrameReader, info: dict[str, Any], peer: str
) -> tuple[dict[str, str], dict[str, Any]]:
    mine = local_versions()
    data = json.dumps({"versions": mine, "info": info}).encode()
    sock.sendall(_U32.pack(len(data)) + data)
    (n,) = _U32.unpack(reader.read_exact(4))
    if n > _HELLO_MAX:
        raise ProtocolError(f"hello from {peer} is {n} bytes (cap {_HELLO_MAX})")
    try:
        hello = json.loads(reader.read_exact(n))
        theirs = {str(k): str(v) for k, v in hello["versions"].items()}
        their_info = dict(hello.get("info", {}))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ProtocolError(f"malformed hello from {peer}") from exc
    _check_versions(mine, theirs, peer)
    return theirs, their_info


def _deadline_timeout(sock: socket.socket, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("handshake deadline passed")
    sock.settimeout(remaining)


def initiate(
    sock: socket.socket,
    reader: FrameReader,
    cookie: bytes,
    info: dict[str, Any],
    *,
    timeout: float,
    peer: str = "peer",
) -> PeerHello:
    """Run the initiator's side of the handshake; the socket is left blocking."""
    deadline = time.monotonic() + timeout
    try:
        _deadline_timeout(sock, deadline)
        ni = os.urandom(_NONCE)
        sock.sendall(MAGIC + bytes([WIRE_VERSION]) + ni)
        got = reader.read_exact(5 + _NONCE + _MAC)
        if got[:4] != MAGIC:
            raise ProtocolError(f"{peer} does not speak distexec's protocol")
        if got[4] != WIRE_VERSION:
            raise VersionMismatchError(
                f"wire version {WIRE_VERSION} here vs {got[4]} on {peer}: upgrade one side"
            )
        nr, their_mac = got[5 : 5 + _NONCE], got[5 + _NONCE :]
        if not hmac.compare_digest(their_mac, _mac(cookie, b"r", ni, nr)):
            raise AuthenticationError(
                f"{peer} does not know the cluster cookie (or it is not a distexec process)"
            )
        sock.sendall(_mac(cookie, b"i", nr, ni))
        _deadline_timeout(sock, deadline)
        versions, their_info = _exchange_hello(sock, reader, info, peer)
        sock.settimeout(None)
        return PeerHello(versions, their_info, integrity.session_key(cookie, ni, nr))
    except TimeoutError as exc:
        raise TimeoutError(f"handshake with {peer} did not finish within {timeout:g} s") from exc
    except EOFError as exc:
        raise AuthenticationError(
            f"{peer} closed the connection during the handshake (wrong cookie?)"
        ) from exc


def respond(
    sock: socket.socket,
    reader: FrameReader,
    cookie: bytes,
    info: dict[str, Any],
    *,
    timeout: float,
    peer: str = "peer",
) -> PeerHello:
    """Run the responder's side; a stranger can make it read only a few fixed-size fields."""
    deadline = time.monotonic() + timeout
    try:
        _deadline_timeout(sock, deadline)
        got = reader.read_exact(5 + _NONCE)
        if got[:4] != MAGIC:
            raise ProtocolError(f"{peer} does not speak distexec's protocol")
        if got[4] != WIRE_VERSION:
            raise VersionMismatchError(f"wire version {WIRE_VERSION} here vs {got[4]} on {peer}")
        ni = got[5:]
        nr = os.urandom(_NONCE)
        sock.sendall(MAGIC + bytes([WIRE_VERSION]) + nr + _mac(cookie, b"r", ni, nr))
        their_mac = reader.read_exact(_MAC)
        if not hmac.compare_digest(their_mac, _mac(cookie, b"i", nr, ni)):
            raise AuthenticationError(f"{peer} sent invalid connection credentials")
        _deadline_timeout(sock, deadline)
        versions, their_info = _exchange_hello(sock, reader, info, peer)
        sock.settimeout(None)
        return PeerHello(versions, their_info, integrity.session_key(cookie, ni, nr))
    except TimeoutError as exc:
        raise TimeoutError(f"handshake with {peer} did not finish within {timeout:g} s") from exc
    except EOFError as exc:
        raise ProtocolError(f"{peer} closed the connection during the handshake") from exc

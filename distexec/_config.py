"""Defaults, and the only place environment variables are read.

Layer: L0 leaf. Imports: stdlib.
"""

from __future__ import annotations

import os

#: Largest single frame (body or out-of-band buffer) a peer may announce, checked before allocation.
MAX_FRAME_BYTES = int(os.environ.get("DISTEXEC_MAX_FRAME_BYTES", str(8 << 30)))
#: Largest number of out-of-band buffers in one message.
MAX_BUFFERS = 4096
#: Seconds an unauthenticated peer has to complete the handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Results whose pickled size is at most this travel with the completion notice;
#: larger ones stay with their owner until someone fetches them.
INLINE_RESULT_BYTES = 1 << 20


def worker_timeout() -> float:
    """Seconds a worker waits for the master, and the master for a worker (Julia's
    ``JULIA_WORKER_TIMEOUT``). Read at use time, as Julia does."""
    value = os.environ.get("DISTEXEC_WORKER_TIMEOUT", "60")
    try:
        return float(value)
    except ValueError:
        raise ValueError(
            f"DISTEXEC_WORKER_TIMEOUT must be a number of seconds, not {value!r}"
        ) from None


#: The values ``DISTEXEC_INTEGRITY`` may take (see :mod:`distexec._transport.integrity`).
INTEGRITY_MODES = ("auto", "frame", "handshake")


def integrity_mode() -> str:
    """This process's wish for per-frame integrity (``DISTEXEC_INTEGRITY``, default ``auto``):
    ``frame`` (a MAC on every frame), ``handshake`` (only the handshake is authenticated;
    honoured on loopback, AF_UNIX and TLS links, and on others only if the peer says so too)
    or ``auto`` (frame MACs on plain TCP to another host). Read at each connection."""
    value = os.environ.get("DISTEXEC_INTEGRITY", "auto").strip().lower() or "auto"
    if value not in INTEGRITY_MODES:
        raise ValueError(
            f"DISTEXEC_INTEGRITY must be one of {', '.join(INTEGRITY_MODES)}, not {value!r}"
        )
    return value

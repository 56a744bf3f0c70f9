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


def _spin_seconds() -> float:
    value = os.environ.get("DISTEXEC_SPIN_US", "50")
    try:
        us = float(value)
    except ValueError:
        raise ValueError(
            f"DISTEXEC_SPIN_US must be a number of microseconds, not {value!r}"
        ) from None
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    # On one CPU a process that polls only keeps its peer from running.
    return max(us, 0.0) * 1e-6 if cpus > 1 else 0.0


#: How long a link's reader polls for a message due any moment (the answer to a lone call,
#: or a sequential caller's next call) before it sleeps: ``DISTEXEC_SPIN_US``, default 50;
#: 0 never polls. Waking a sleeping process costs tens of microseconds on a small VM.
SPIN_SECONDS = _spin_seconds()


#: The master's multiprocessing authkey, on a local worker (from stdin); set as this
#: process's only when multiprocessing is needed (``codec``), since importing it costs ~5 ms.
mp_authkey: bytes | None = None


def install_mp_authkey() -> None:
    """Make :data:`mp_authkey` this process's multiprocessing authkey (once)."""
    global mp_authkey
    key, mp_authkey = mp_authkey, None
    if key:
        import multiprocessing

        multiprocessing.current_process().authkey = key


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

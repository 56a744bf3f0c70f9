"""Many threads calling two fresh workers that call each other, over plain links and TLS.

Each round starts two workers and, from 8 threads at once, sends them calls of all sizes,
some of which call the other worker, so both workers make their first call to each other
at about the same time. That once left the two sides of their link disagreeing about which
of two crossed dials they kept (about 1 round in 10 hung over plain links, 3 in 4 over
TLS); every wait here has a deadline, so such a bug fails the test instead of hanging it.

Layer: tests. Imports: stdlib, pytest, cloudpickle, tlscerts, distexec.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import cloudpickle
import pytest
from tlscerts import Certs

import distexec as dx

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leaked_workers")]

# Workers need not import this test module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROUNDS = 4
THREADS = 8
CALLS = 120


def _identity(x: object) -> object:
    return x


def _via(other: int, x: object) -> object:
    return dx.remotecall(_identity, other, x).fetch(timeout=20)


def _round(tls: dx.TLSConfig | None) -> None:
    lo, hi = dx.addprocs(2, tls=tls)
    errors: list[str] = []

    def caller(k: int) -> None:
        try:
            for i in range(CALLS):
                w, other = (lo, hi) if (k + i) % 2 else (hi, lo)
                v = (k, i, os.urandom(300_000) if i % 37 == 0 else i)
                if i % 5 == 0:  # through the other worker: the worker-to-worker link
                    got = dx.remotecall(_via, w, other, v).fetch(timeout=30)
                else:  # the caller reads its own reply
                    got = dx.remotecall_fetch(_identity, w, v)
                assert got == v
        except BaseException as exc:  # reported below, with the round's other failures
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(THREADS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a caller is still waiting"
        assert not errors, errors[:3]
    finally:
        dx.rmprocs([lo, hi])


@pytest.mark.parametrize("kind", ["plain", "tls"])
def test_threads_calling_two_workers_that_call_each_other(kind: str, certs: Certs) -> None:
    tls: Any = certs.config() if kind == "tls" else None
    for _ in range(ROUNDS):
        _round(tls)

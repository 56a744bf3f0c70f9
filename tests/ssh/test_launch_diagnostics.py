"""Launch failures SSHManager reports per host, fast, while the other hosts come up.

Layer: tests. Imports: stdlib, pytest, psutil, sshinfra, helpers, distexec.

Refused ports, failed logins, a worker that never prints its address and ``timeout=`` are
covered in ``test_ssh_manager.py``; here: hosts that cannot be reached at all.
"""

from __future__ import annotations

import time

import pytest
import sshinfra
from sshinfra import SSHServer

import distexec as dx

#: TEST-NET-2 (RFC 5737): routed nowhere here, so packets vanish and ssh hears nothing.
BLACKHOLE = "198.51.100.1"


kw = sshinfra.addprocs_kwargs
pytestmark = pytest.mark.usefixtures("no_ssh_leftovers")


unreachable = [
    pytest.param(
        "nosuchhost.invalid", dx.LaunchError, "Could not resolve hostname", id="unresolvable"
    ),
    # Silence (no SYN-ACK, or a middlebox that accepts and says nothing): the launch
    # timeout, or ssh's own connect timeout if the client config sets one, whichever is first.
    pytest.param(
        BLACKHOLE,
        dx.LaunchError,
        r"did not start within 5 s|timed out|unreachable|No route",
        id="blackhole",
    ),
]


@pytest.mark.ssh
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("host", "exc", "message"), unreachable)
def test_an_unreachable_host_fails_alone_within_the_timeout(
    sshd: SSHServer, host: str, exc: type[Exception], message: str
) -> None:
    started = time.monotonic()
    with pytest.raises(exc, match=message) as info:
        dx.addprocs(
            [host, (sshd.destination, 2)], timeout=5, allow_insecure_network=True, **kw(sshd)
        )
    assert time.monotonic() - started < 15  # timeout=5 overrides DISTEXEC_WORKER_TIMEOUT (60)
    assert info.value.host == host  # type: ignore[attr-defined]
    good = dx.workers()
    assert len(good) == 2 and 1 not in good  # the reachable host's workers came up and stay
    assert [dx.remotecall_fetch(dx.myid, p) for p in good] == good

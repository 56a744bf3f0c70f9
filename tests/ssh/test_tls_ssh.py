"""TLS on links that leave the host: SSH workers on network-namespace hosts and loopback.

Layer: tests. Imports: stdlib, pytest, psutil, cloudpickle, sshinfra, helpers, distexec, and
``tlscerts`` from tests/transport.

Namespace hosts share the filesystem, so the certificate paths are the same "there". The
worker certificate carries each host's address, so the default name check (the address
dialled) is what runs.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import cloudpickle
import pytest
import sshinfra
from sshinfra import NetnsHosts, SSHServer

import distexec as dx
from distexec import _cluster
from distexec._transport.tls import TLSStream

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "transport"))
from tlscerts import make_certs

cloudpickle.register_pickle_by_value(sys.modules[__name__])


kw = sshinfra.addprocs_kwargs
pytestmark = pytest.mark.usefixtures("no_ssh_leftovers")


def ask(pid: int) -> int:
    import distexec

    return distexec.remotecall_fetch(distexec.myid, pid)


def master_link() -> str:
    """Run on a worker: its link to pid 1 and the address it listens on."""
    from distexec import _cluster

    g = _cluster.group()
    sock = g.peer(1).conn.sock  # type: ignore[union-attr]
    return f"{type(sock).__name__} {sock.version()} {g.listen_address[0]}"


@pytest.mark.ssh
@pytest.mark.netns
@pytest.mark.timeout(90)
def test_tls_between_hosts(netns_hosts: NetnsHosts, tmp_path: Path) -> None:
    host_a, host_b = netns_hosts[0], netns_hosts[1]
    certs = make_certs(tmp_path, host_a.addr, host_b.addr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # TLS: no warning about plain links
        pids = dx.addprocs(
            [host_a.destination, host_b.destination], tls=certs.config(), **kw(netns_hosts)
        )
    assert len(pids) == 2
    seen = {dx.remotecall_fetch(master_link, p) for p in pids}
    assert seen == {f"TLSStream TLSv1.3 {host_a.addr}", f"TLSStream TLSv1.3 {host_b.addr}"}
    for p in pids:
        assert isinstance(_cluster.group().peer(p).conn.sock, TLSStream)  # type: ignore[union-attr]
    w1, w2 = pids
    assert dx.remotecall_fetch(ask, w2, w1) == w1  # host b dials host a, over TLS
    assert dx.remotecall_fetch(ask, w1, w2) == w2


@pytest.mark.ssh
@pytest.mark.netns
@pytest.mark.timeout(90)
def test_plain_links_between_hosts_need_consent(netns_hosts: NetnsHosts) -> None:
    host_a = netns_hosts[0]
    with pytest.warns(UserWarning, match=rf"listen on {host_a.addr} without TLS.*allow_insecure"):
        pids = dx.addprocs([host_a.destination], **kw(netns_hosts))
    dx.rmprocs(pids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pids = dx.addprocs([host_a.destination], allow_insecure_network=True, **kw(netns_hosts))
        dx.rmprocs(pids)
        pids = dx.addprocs([host_a.destination], tunnel=True, **kw(netns_hosts))  # loopback there
    assert len(pids) == 1


@pytest.mark.ssh
@pytest.mark.timeout(90)
def test_tls_over_ssh_and_a_worker_with_a_foreign_certificate(
    sshd: SSHServer, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path)
    [pid] = dx.addprocs([sshd.destination], tls=certs.config(), **kw(sshd))
    assert dx.remotecall_fetch(master_link, pid).startswith("TLSStream TLSv1.3")
    dx.rmprocs(pid)
    bad = certs.config(worker_cert=certs.foreign)
    with pytest.raises(dx.AuthenticationError, match="not the one configured here"):
        dx.addprocs([sshd.destination], tls=bad, **kw(sshd))
    assert dx.workers() == [1]

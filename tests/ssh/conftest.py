"""Fixtures for tests that need a real OpenSSH server: ``ssh_keys``, ``sshd``, ``netns_hosts``.

Layer: tests. Imports: stdlib, pytest, sshinfra (tests/ is on sys.path, as for helpers).

All three are session-scoped. The machinery, and what the remote side looks like, is
documented in ``tests/sshinfra.py``. Minimal use::

    @pytest.mark.ssh
    def test_something(sshd):
        addprocs([sshd.destination], sshflags=sshd.sshflags,
                 exename=sshd.python, env=sshd.remote_env)

When OpenSSH or network namespaces are missing, the fixtures skip with the reason;
``DISTEXEC_REQUIRE_SSH=1`` / ``DISTEXEC_REQUIRE_NETNS=1`` (set them in CI) make that a failure.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parents[1])
if _TESTS_DIR not in sys.path:  # tests/conftest.py normally puts it there (helpers, sshinfra)
    sys.path.insert(0, _TESTS_DIR)

import sshinfra  # noqa: E402
from sshinfra import REQUIRE_NETNS, REQUIRE_SSH, skip_or_fail  # noqa: E402


def _start(resource: sshinfra.SSHServer | sshinfra.NetnsHosts) -> sshinfra.InfraUnavailable | None:
    """Start *resource*; return why it is unavailable instead of raising (None on success)."""
    try:
        resource.start()
    except sshinfra.InfraUnavailable as exc:
        return exc
    return None


@pytest.fixture(scope="session")
def ssh_keys(tmp_path_factory: pytest.TempPathFactory) -> sshinfra.SSHKeys:
    """Host key, registered user key and an unregistered ``wrong_key``, shared by all servers."""
    try:
        return sshinfra.SSHKeys.generate(tmp_path_factory.mktemp("sshkeys"))
    except sshinfra.InfraUnavailable as exc:
        problem = exc  # skip outside the except block: no chained traceback in the report
    skip_or_fail(problem, REQUIRE_SSH, REQUIRE_NETNS)


@pytest.fixture(scope="session")
def sshd(
    ssh_keys: sshinfra.SSHKeys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[sshinfra.SSHServer]:
    """A real sshd on ``127.0.0.1:<free port>``, alias ``dxhost``; see :class:`SSHServer`."""
    server = sshinfra.SSHServer(ssh_keys, tmp_path_factory.mktemp("sshd"))
    problem = _start(server)
    if problem is not None:
        skip_or_fail(problem, REQUIRE_SSH)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def netns_hosts(
    ssh_keys: sshinfra.SSHKeys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[sshinfra.NetnsHosts]:
    """Two namespace "hosts" (``dxhost-a``, ``dxhost-b``), each with its own sshd on port 22."""
    hosts = sshinfra.NetnsHosts(ssh_keys, tmp_path_factory.mktemp("netns"), count=2)
    problem = _start(hosts)
    if isinstance(problem, sshinfra.NetnsUnavailable):
        skip_or_fail(problem, REQUIRE_NETNS)
    if problem is not None:
        skip_or_fail(problem, REQUIRE_SSH, REQUIRE_NETNS)
    try:
        yield hosts
    finally:
        hosts.close()


@pytest.fixture
def no_ssh_leftovers() -> Iterator[None]:
    """After the test: remove its workers and wait until no ssh client (master connections
    included) and no control-socket directory of this process is left."""
    import os
    import tempfile

    import distexec as dx

    def control_dirs() -> list[str]:
        prefix = f"dxssh-{os.getpid()}-"
        bases = {tempfile.gettempdir(), "/tmp"}
        return [n for b in bases if os.path.isdir(b) for n in os.listdir(b) if n.startswith(prefix)]

    yield
    live = [p for p in dx.workers() if p != 1]
    if live:
        dx.rmprocs(live)
    sshinfra.wait_until(
        lambda: not sshinfra.ssh_client_children(), timeout=15, what="no ssh client left"
    )
    sshinfra.wait_until(lambda: not control_dirs(), timeout=5, what="no control directory left")

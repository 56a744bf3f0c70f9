"""pmap without workers: it runs here, with the same semantics."""

from __future__ import annotations

import pytest

import distexec as dx

pytestmark = pytest.mark.timeout(30)


def test_no_workers_runs_locally() -> None:
    assert dx.workers() == [1]
    assert dx.pmap(lambda x: x + 1, range(5)) == [1, 2, 3, 4, 5]
    assert dx.pmap(lambda x: 1 / 0 if x == 2 else x, range(4), on_error=lambda e: "e") == [
        0,
        1,
        "e",
        3,
    ]
    with pytest.raises(dx.RemoteException) as info:
        dx.pmap(lambda x: 1 / 0, [1])
    assert info.value.pid == 1


def test_batchsplit() -> None:
    from distexec.pmap import batchsplit

    assert list(batchsplit(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batchsplit([], 3)) == []

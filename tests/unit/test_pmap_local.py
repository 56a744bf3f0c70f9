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


def _fails_on_multiples_of_three(x: int) -> int:
    if x % 3 == 0:
        raise ValueError(x)
    if x == 5:
        raise StopIteration  # an exception like any other here, not the end of the batch
    return 10 * x


@pytest.mark.parametrize("star", [False, True])
def test_run_batch_captures_each_failure_at_its_index_and_runs_every_item_once(
    star: bool,
) -> None:
    from distexec.pmap import _run_batch

    calls: list[int] = []

    def f(x: int, y: int = 0) -> int:
        calls.append(x)
        return _fails_on_multiples_of_three(x + y)

    items: list[object] = [(x, 0) for x in range(10)] if star else list(range(10))
    values, errors = _run_batch(f, items, star)
    assert calls == list(range(10))
    assert errors is not None and sorted(errors) == [0, 3, 5, 6, 9]
    assert [type(errors[i].captured.ex) for i in (0, 5)] == [ValueError, StopIteration]
    assert values == [None, 10, 20, None, 40, None, None, 70, 80, None]
    assert _run_batch(f, [], star) == ([], None)
    assert _run_batch(f, [(1, 0)] if star else [1], star) == ([10], None)

"""Functions of ``__main__`` reuse their pickle while what they capture stays the same object.

A worker cannot import the master's script, so such a function travels by value. From its
second use its pickle is cached (``distexec._protocol.byvalue``); these tests check, on real
workers, that every change cloudpickle would have carried still arrives: a global rebound or
mutated in place, a helper redefined, defaults or code replaced, a closure cell rebound. The
functions are made by ``exec`` in a namespace named ``__main__``, which is what a script's
functions are to pickle.
"""

from __future__ import annotations

import textwrap
import threading
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import distexec as dx
from distexec._protocol import byvalue, codec

pytestmark = pytest.mark.timeout(60)

_CACHED = b"distexec._protocol.byvalue"


def script(src: str) -> dict[str, Any]:
    """Run *src* as if it were the master's script: its functions belong to ``__main__``."""
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(textwrap.dedent(src), ns)
    return ns


def calls(fn: Callable[..., object], pid: int, n: int = 3, *args: object) -> list[object]:
    return [dx.remotecall_fetch(fn, pid, *args) for _ in range(n)]


def body_of(obj: object) -> bytes:
    body, _buffers = codec.dumps(obj)
    return body


# -- the codec, in this process


def test_the_second_use_on_sends_the_cached_pickle() -> None:
    ns = script("def f(x):\n    return x + 1\n")
    f = ns["f"]
    assert f.__module__ == "__main__"
    first, second, third = (body_of((f, (1,))) for _ in range(3))
    assert _CACHED not in first  # first use: cloudpickle, nothing kept but a note
    assert _CACHED in second and _CACHED in third
    g, args = codec.loads(third)
    assert g is not f and g(*args) == 2


def test_lambdas_and_closures_of_main_are_cached_too() -> None:
    ns = script("def make(k):\n    return lambda x: x * k\nf = make(3)\n")
    f = ns["f"]
    for _ in range(2):
        body_of(f)
    body = body_of(f)
    assert _CACHED in body
    assert codec.loads(body)(5) == 15


def test_a_class_of_main_beside_it_makes_the_whole_message_go_through_cloudpickle() -> None:
    ns = script("class C:\n    v = 4\ndef f(c):\n    return c.v\n")
    f, c = ns["f"], ns["C"]()
    for _ in range(3):
        body_of(f)
    body = body_of((f, c))
    assert _CACHED not in body
    g, obj = codec.loads(body)
    assert g(obj) == 4


def test_a_function_capturing_a_mutable_global_is_never_cached() -> None:
    ns = script("L = [1, 2]\ndef f():\n    return sum(L)\n")
    for _ in range(4):
        assert _CACHED not in body_of(ns["f"])


def test_only_what_pickles_the_same_while_it_is_the_same_object_counts_as_safe() -> None:
    ns = script(
        """
        import math
        T = (1, "a", (2.0, None), frozenset({3}))
        D = {"k": 1}
        def f(x: int, y: "str" = "s", *, z: tuple[int, ...] = (1,)) -> list[int]:
            return [math.floor(x), len(T)]
        def g():
            return D
        """
    )
    assert byvalue._snapshot(ns["f"], {}) is not None
    assert byvalue._snapshot(ns["g"], {}) is None


# -- on a worker: every change still arrives


def test_a_rebound_global_arrives(cluster: list[int]) -> None:
    ns = script("K = 1\ndef f():\n    return K\n")
    assert calls(ns["f"], cluster[0]) == [1, 1, 1]
    ns["K"] = 2
    assert calls(ns["f"], cluster[0], 2) == [2, 2]
    ns["K"] = "two"
    assert dx.remotecall_fetch(ns["f"], cluster[0]) == "two"


def test_a_global_mutated_in_place_arrives(cluster: list[int]) -> None:
    ns = script("L = [1]\ndef f():\n    return sum(L)\n")
    assert calls(ns["f"], cluster[0]) == [1, 1, 1]
    ns["L"].append(2)
    assert dx.remotecall_fetch(ns["f"], cluster[0]) == 3


def test_a_redefined_helper_arrives(cluster: list[int]) -> None:
    ns = script("def h():\n    return 1\ndef f():\n    return h() + 10\n")
    assert calls(ns["f"], cluster[0]) == [11, 11, 11]
    exec("def h():\n    return 2\n", ns)
    assert dx.remotecall_fetch(ns["f"], cluster[0]) == 12


def test_a_helper_whose_own_global_changed_arrives(cluster: list[int]) -> None:
    ns = script("N = 1\ndef h():\n    return N\ndef f():\n    return h()\n")
    assert calls(ns["f"], cluster[0]) == [1, 1, 1]
    ns["N"] = 5
    assert dx.remotecall_fetch(ns["f"], cluster[0]) == 5


def test_new_defaults_code_and_names_arrive(cluster: list[int]) -> None:
    ns = script("def f(x=1):\n    return x\ndef g(x=1):\n    return -x\n")
    f = ns["f"]
    assert calls(f, cluster[0]) == [1, 1, 1]
    f.__defaults__ = (7,)
    assert dx.remotecall_fetch(f, cluster[0]) == 7
    f.__code__ = ns["g"].__code__
    assert dx.remotecall_fetch(f, cluster[0]) == -7
    f.__doc__ = "changed"
    assert dx.remotecall_fetch(lambda fn: fn.__doc__, cluster[0], f) == "changed"


def test_a_rebound_closure_cell_arrives(cluster: list[int]) -> None:
    ns = script(
        """
        def make():
            k = 1
            def f():
                return k
            def bump():
                nonlocal k
                k += 1
            return f, bump
        f, bump = make()
        """
    )
    f = ns["f"]
    assert calls(f, cluster[0]) == [1, 1, 1]
    ns["bump"]()
    assert dx.remotecall_fetch(f, cluster[0]) == 2


def test_each_call_still_gets_fresh_globals_on_the_worker(cluster: list[int]) -> None:
    ns = script("C = 0\ndef f():\n    global C\n    C += 1\n    return C\n")
    assert calls(ns["f"], cluster[0], 5) == [1] * 5


def test_a_function_that_attributes_were_given_is_sent_afresh(cluster: list[int]) -> None:
    ns = script("def f():\n    return f.tag\n")
    f = ns["f"]
    f.tag = "a"
    assert calls(f, cluster[0]) == ["a"] * 3
    f.tag = "b"
    assert dx.remotecall_fetch(f, cluster[0]) == "b"


def test_the_executor_and_pmap_send_cached_functions_too(cluster: list[int]) -> None:
    ns = script("OFFSET = 100\ndef f(x):\n    return x + OFFSET\n")
    assert dx.pmap(ns["f"], range(6)) == [100, 101, 102, 103, 104, 105]
    with dx.DistributedExecutor(pool=dx.WorkerPool(cluster)) as ex:
        assert [ex.submit(ns["f"], i).result() for i in range(4)] == [100, 101, 102, 103]
        ns["OFFSET"] = 0
        assert list(ex.map(ns["f"], range(4))) == [0, 1, 2, 3]


# -- the receiver's copies


def _received(fn: Callable[..., object]) -> list[Callable[..., Any]]:
    """*fn* as three calls' receivers get it: the second and third from the cached pickle."""
    out = []
    for _ in range(3):
        body = body_of(fn)
        out.append(codec.loads(body))
    assert _CACHED in body
    return out


def test_each_received_copy_has_its_own_globals_cells_and_helpers() -> None:
    ns = script(
        """
        N = 0
        def helper():
            global N
            N += 1
            return N
        def fact(n):
            return 1 if n <= 1 else n * fact(n - 1)
        def make():
            k = 10
            def f():
                nonlocal k
                k += 1
                return (k, helper(), fact(4))
            return f
        f = make()
        """
    )
    _, a, b = _received(ns["f"])
    assert a() == (11, 1, 24) and a() == (12, 2, 24)
    assert b() == (11, 1, 24)  # b shares nothing a changed
    assert a.__globals__ is not b.__globals__
    helper_a = a.__globals__["helper"]
    assert helper_a.__globals__ is a.__globals__  # as one cloudpickle gives: one namespace
    assert a.__globals__["fact"] is not b.__globals__["fact"]


def test_a_recursive_function_calls_its_own_copy() -> None:
    ns = script(
        """
        CALLS = 0
        def fact(n):
            global CALLS
            CALLS += 1
            return 1 if n <= 1 else n * fact(n - 1)
        """
    )
    _, a, b = _received(ns["fact"])
    assert a(5) == 120 and a.__globals__["CALLS"] == 5
    assert b.__globals__["CALLS"] == 0
    assert a.__globals__["fact"] is a


def test_copies_keep_names_defaults_and_annotations() -> None:
    ns = script(
        '''
        def f(x: int, y=2, *, z=3) -> int:
            """doc"""
            return x + y + z
        '''
    )
    _, a, b = _received(ns["f"])
    assert (a.__name__, a.__qualname__, a.__module__, a.__doc__) == ("f", "f", "__main__", "doc")
    assert a(1) == 6 and a.__defaults__ == (2,) and a.__kwdefaults__ == {"z": 3}
    assert a.__annotations__ == ns["f"].__annotations__ and a.__annotations__
    a.__kwdefaults__["z"] = 100
    assert b(1) == 6


# -- any sequence of changes: the receiver's copy always agrees with the function itself

_STATE = """
import math
N = 1
S = "s"
T = (1, 2)
L = [1]
def helper(x):
    return x + N
def f(a=0, *, b=1):
    return (a, b, N, S, T, helper(a), math.floor(2.5))
def g():
    return (tuple(L), N)
"""

_CHANGES = st.sampled_from(
    [
        "N = N + 1",
        "S = S + 'x'",
        "T = T + (3,)",
        "L.append(len(L))",
        "L = (7,)",
        "def helper(x):\n    return x - N",
        "f.__defaults__ = (f.__defaults__[0] + 1,)",
        "f.__kwdefaults__['b'] += 1",
        "f.__kwdefaults__ = {'b': 5}",
        "math = __import__('math')",
        "del N",
        "N = 3",
    ]
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_CHANGES, st.integers(0, 3)), max_size=12))
def test_whatever_changes_between_calls_the_receiver_sees_it(
    steps: list[tuple[str, int]],
) -> None:
    ns = script(_STATE)
    for change, calls_before in steps:
        for _ in range(calls_before):
            _check_agrees(ns, "f")
            _check_agrees(ns, "g")
        try:
            exec(change, ns)
        except (NameError, AttributeError):  # "N = N + 1" after "del N"; L a tuple
            pass
    for _ in range(3):
        cached = _check_agrees(ns, "f")
        _check_agrees(ns, "g")
    if byvalue._cache.get(ns["f"]) is not byvalue._UNCACHEABLE:  # changed too often
        assert cached  # three calls with no change in between: the third is cached


def _check_agrees(ns: dict[str, Any], name: str) -> bool:
    """Whether a call of *ns[name]* gives the same there as here; True if it was cached."""
    fn = ns[name]
    try:
        expected: object = fn()
    except NameError as exc:
        expected = type(exc)
    body = body_of(fn)
    got = codec.loads(body)
    try:
        actual: object = got()
    except NameError as exc:
        actual = type(exc)
    assert actual == expected
    return _CACHED in body


def test_threads_encoding_while_a_global_is_rebound_see_a_value_it_had() -> None:
    ns = script("K = 0\ndef f():\n    return K\n")
    f = ns["f"]
    stop = threading.Event()
    errors: list[str] = []

    def rebind() -> None:  # a few times only: past 8 rebuilds a function is not cached
        for _ in range(6):
            if stop.wait(0.003):
                return
            ns["K"] += 1

    def encode() -> None:
        for _ in range(400):
            before = ns["K"]
            got = codec.loads(body_of(f))()
            after = ns["K"]
            if not before <= got <= after:
                errors.append(f"{got} outside [{before}, {after}]")

    writer = threading.Thread(target=rebind)
    writer.start()
    try:
        threads = [threading.Thread(target=encode) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        writer.join()
    assert not errors, errors[:5]
    assert byvalue._cache[f] is not byvalue._UNCACHEABLE

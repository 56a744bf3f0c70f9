"""Functions sent by name (distexec._protocol.names): what qualifies, and that the receiver
always finds what unpickling the name would find now."""

from __future__ import annotations

import functools
import importlib
import math
import operator
import pickle
import sys
import types

import pytest

from distexec._protocol import codec, names
from distexec._protocol.messages import CallMode, CallMsg
from distexec._transport import framing

pytestmark = pytest.mark.timeout(30)


def _roundtrip(msg: CallMsg) -> CallMsg:
    parts = codec.encode(msg, response_id=1)
    body = memoryview(parts[0])[framing.HEADER_SIZE :]
    frame = framing.Frame(CallMsg.TAG, 0, 0, 1, 0, body, [])
    out = codec.decode(frame)
    assert isinstance(out, CallMsg)
    return out


def test_module_functions_and_builtins_go_by_name() -> None:
    assert names.ref_of(math.sqrt) == "math:sqrt"
    assert names.ref_of(operator.pos) == "_operator:pos"
    assert names.ref_of(importlib.import_module) == "importlib:import_module"
    assert names.resolve("math:sqrt") is math.sqrt
    assert names.resolve(names.ref_of(pow) or "") is pow


@pytest.mark.parametrize(
    "fn",
    [
        str.upper,  # a method descriptor
        [].append,  # a bound builtin method
        functools.partial(pow, 2),
        lambda x: x,
        pickle.Pickler.dump,  # qualname with a dot
        types.SimpleNamespace,  # a class
    ],
)
def test_anything_else_is_pickled(fn: object) -> None:
    assert names.ref_of(fn) is None


def test_a_name_rebound_is_looked_up_again(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = types.ModuleType("dx_names_probe")
    exec("def f():\n    return 1\n", mod.__dict__)
    mod.f.__module__ = "dx_names_probe"
    monkeypatch.setitem(sys.modules, "dx_names_probe", mod)
    first = mod.f
    assert names.ref_of(first) == "dx_names_probe:f"
    assert names.resolve("dx_names_probe:f") is first
    exec("def f():\n    return 2\n", mod.__dict__)  # rebinding, as reload does
    assert names.resolve("dx_names_probe:f")() == 2
    # The sender no longer names the old function: it is not what the module holds.
    assert names.ref_of(first) is None
    # A module replaced in sys.modules is the one looked in, on both ends.
    second = mod.f
    assert names.ref_of(second) == "dx_names_probe:f"
    other = types.ModuleType("dx_names_probe")
    other.f = lambda: 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dx_names_probe", other)
    assert names.resolve("dx_names_probe:f")() == 3
    assert names.ref_of(second) is None  # no longer what the module of that name holds


def test_unknown_names_fail_as_unpickling_would() -> None:
    with pytest.raises(ModuleNotFoundError):
        names.resolve("no_such_module_dx:f")
    with pytest.raises(AttributeError):
        names.resolve("math:no_such_function")
    with pytest.raises(ValueError, match="malformed"):
        names.resolve("math")


def test_a_call_round_trips_with_its_function_by_name() -> None:
    msg = CallMsg(math.pow, (2, 3), {"x": 1}, CallMode.ORDERED)
    parts = codec.encode(msg, response_id=1)
    assert b"math:pow" in bytes(parts[0])
    out = _roundtrip(msg)
    assert out.fn is math.pow and out.args == (2, 3) and out.kwargs == {"x": 1}
    assert out.mode is CallMode.ORDERED and out.ticket == -1  # the ticket never travels
    lam = _roundtrip(CallMsg(lambda: 5, (), {}, CallMode.FETCH))
    assert lam.fn() == 5


def test_a_function_of_a_module_pickled_by_value_is_not_sent_by_name() -> None:
    import cloudpickle

    mod = types.ModuleType("dx_names_by_value")
    exec("def g(x):\n    return x + 1\n", mod.__dict__)
    mod.g.__module__ = "dx_names_by_value"
    sys.modules["dx_names_by_value"] = mod
    try:
        assert names.ref_of(mod.g) == "dx_names_by_value:g"
        cloudpickle.register_pickle_by_value(mod)
        try:
            parts = codec.encode(CallMsg(mod.g, (1,), {}, CallMode.FETCH), response_id=1)
            assert b"dx_names_by_value:g" not in bytes(parts[0])
            del sys.modules["dx_names_by_value"]  # the receiver need not have the module
            out = _roundtrip(CallMsg(mod.g, (1,), {}, CallMode.FETCH))
            assert out.fn(1) == 2
        finally:
            cloudpickle.unregister_pickle_by_value(mod)
    finally:
        sys.modules.pop("dx_names_by_value", None)


def test_a_cached_by_value_function_rides_raw_in_a_calls_slot_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From its second use a __main__ function's cached pickle goes in the call's function
    slot as bytes (decode rebuilds it); anywhere else, as in a value that happens to be a
    tuple starting with such a function, it must still unpickle into the function. (Only
    while no module is registered for pickling by value, as test modules of this suite do:
    then the cached pickle goes through the reducer path instead.)"""
    from distexec._protocol import byvalue

    monkeypatch.setattr(byvalue, "_registry", set())
    ns: dict[str, object] = {"__name__": "__main__"}
    exec("def triple(x):\n    return 3 * x\n", ns)
    triple = ns["triple"]
    assert getattr(triple, "__module__", None) == "__main__"
    for _ in range(3):  # cached from the second use
        out = _roundtrip(CallMsg(triple, (2,), {}, CallMode.FETCH))  # type: ignore[arg-type]
        assert out.fn(*out.args) == 6
    body, buffers = codec.dumps((triple, 5))
    fn, arg = codec.loads(body, buffers)  # type: ignore[misc]
    assert callable(fn) and fn(arg) == 15
    parts = codec.encode(CallMsg(triple, (2,), {}, CallMode.FETCH), response_id=1)  # type: ignore[arg-type]
    assert b"byvalue" not in bytes(parts[0])  # no reduce wrapper around the cached pickle


def test_the_receivers_template_cache_drops_the_oldest_first() -> None:
    import cloudpickle

    from distexec._protocol import byvalue

    byvalue._templates.clear()
    blobs = []
    for i in range(byvalue._MAX_TEMPLATES + 20):
        ns: dict[str, object] = {"__name__": "__main__"}
        exec(f"def f{i}():\n    return {i}\n", ns)
        blobs.append(cloudpickle.dumps(ns[f"f{i}"], protocol=5))
    for i, blob in enumerate(blobs):
        assert byvalue.load(blob)() == i
    assert len(byvalue._templates) <= byvalue._MAX_TEMPLATES
    assert blobs[-1] in byvalue._templates and blobs[0] not in byvalue._templates
    assert byvalue.load(blobs[0])() == 0  # rebuilt on a miss
    byvalue._templates.clear()


def test_a_half_imported_cloudpickle_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """cloudpickle is imported lazily, so another thread may be importing it while a link
    shakes hands or a message is pickled: its module is then in sys.modules without its
    attributes yet. The hello's version and the by-value registry must not come from it
    (the hello failed with AttributeError, and a worker-to-worker link with it)."""
    import cloudpickle

    from distexec._protocol import byvalue
    from distexec._transport import handshake

    half = types.ModuleType("cloudpickle")
    half.__spec__ = cloudpickle.__spec__  # set before the module's code runs, as import does
    monkeypatch.setitem(sys.modules, "cloudpickle", half)
    monkeypatch.setitem(
        sys.modules, "cloudpickle.cloudpickle", types.ModuleType("cloudpickle.cloudpickle")
    )
    monkeypatch.setattr(handshake, "_cloudpickle_version_seen", "")
    monkeypatch.setattr(byvalue, "_registry", byvalue._NO_REGISTRY)
    assert handshake.local_versions()["cloudpickle"] == cloudpickle.__version__
    assert not byvalue.any_registered()
    assert byvalue._registry is byvalue._NO_REGISTRY  # not bound to a stand-in


def test_a_call_with_a_ticket_from_the_wire_is_refused() -> None:
    """The turn of an ORDERED call is taken where it is received; a call whose body carries
    a sixth field (a ticket) would wait for a turn that never comes: it is refused."""
    import pickle

    from distexec.errors import ProtocolError

    body = pickle.dumps(("math:pow", (2, 3), {}, int(CallMode.FETCH), None, 10**9), 5)
    frame = framing.Frame(CallMsg.TAG, 0, 0, 1, 0, memoryview(body), [])
    with pytest.raises(ProtocolError, match="6 fields"):
        codec.decode(frame)

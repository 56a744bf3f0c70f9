"""Module-level functions sent by name: ``"module:name"`` in a call's function field.

Layer: L2 protocol. Imports: stdlib.

Pickle writes a function of an importable module as its module and name too, but it checks
the name by importing the module each time (about 0.6 us to pickle, 0.5 us to unpickle, for
each function of each call). Here both ends keep what they looked up, and check it again
with two dictionary lookups: a name rebound since (a monkeypatch, ``importlib.reload``, a
module replaced in ``sys.modules``) is looked up afresh, so the result is always what
unpickling would give. Only plain functions and builtins bound to their module's top level
qualify; anything else (methods, partials, callable objects, functions of ``__main__``) is
pickled as before.
"""

from __future__ import annotations

import sys
import types
from typing import Any

_NAMED_TYPES = (types.FunctionType, types.BuiltinFunctionType)
_CACHE_MAX = 4096

#: id(fn) -> (fn, "module:name", module name, module, name). Holding *fn* keeps its id.
_sent: dict[int, tuple[Any, str, str, types.ModuleType, str]] = {}
#: "module:name" -> (module name, module, name)
_found: dict[str, tuple[str, types.ModuleType, str]] = {}
_MISSING = object()


def ref_of(fn: object) -> str | None:
    """``"module:name"`` if *fn* is what that name holds in its module now, else None
    (pickle's own check: otherwise it would not pickle *fn* by reference either)."""
    hit = _sent.get(id(fn))
    if (
        hit is not None
        and hit[0] is fn
        and sys.modules.get(hit[2]) is hit[3]
        and hit[3].__dict__.get(hit[4], _MISSING) is fn
    ):
        return hit[1]
    if type(fn) not in _NAMED_TYPES:
        return None
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None)
    if type(module) is not str or type(name) is not str or module == "__main__" or "." in name:
        return None
    mod = sys.modules.get(module)
    namespace = getattr(mod, "__dict__", None)
    if (
        not isinstance(mod, types.ModuleType)
        or type(namespace) is not dict
        or namespace.get(name, _MISSING) is not fn
    ):
        return None
    ref = f"{module}:{name}"
    if len(_sent) >= _CACHE_MAX:
        _sent.clear()
    _sent[id(fn)] = (fn, ref, module, mod, name)
    return ref


def resolve(ref: str) -> Any:
    """The object *ref* names, as unpickling ``module.name`` would find it now.

    Raises what unpickling would: ``ModuleNotFoundError``, ``AttributeError``, ... (callers
    answer the call with it).
    """
    hit = _found.get(ref)
    if hit is not None and sys.modules.get(hit[0]) is hit[1]:
        fn = hit[1].__dict__.get(hit[2], _MISSING)
        if fn is not _MISSING:
            return fn
    module_name, sep, name = ref.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"malformed function reference {ref!r}")
    __import__(module_name)
    module = sys.modules[module_name]
    fn = getattr(module, name)
    if len(_found) >= _CACHE_MAX:
        _found.clear()
    _found[ref] = (module_name, module, name)
    return fn

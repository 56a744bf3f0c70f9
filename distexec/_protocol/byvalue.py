"""Functions of ``__main__`` pickled by value once, then reused while nothing they capture changed.

Layer: L2 protocol. Imports: stdlib, cloudpickle (when first needed).

A worker does not import the master's script, so a function defined there travels by value:
cloudpickle pickles its code, the globals it names, its defaults and closure, on every call.
That costs tens of microseconds a call, more than the rest of a round trip. Julia ships the code
of a closure once per connection and its captured data every call; here the whole pickled
function (the *blob*) is kept and sent again as long as a cheap identity check shows that
everything cloudpickle would capture is the same object as before, and every such object is
immutable (numbers, strings, tuples of them) or pickled by reference (modules, importable
functions and classes). A function capturing anything mutable (a list, a dict, a class or an
instance of ``__main__``) is pickled afresh every call, as before, so a change made in place is
never missed. The receiver unpickles a blob once and gives each call a fresh copy of it (fresh
globals, fresh closure cells), exactly what a whole-message cloudpickle gives.

A function is cached only from its second use, so lambdas made for one call cost nothing extra.
"""

from __future__ import annotations

import operator
import pickle
import sys
import types
import weakref
from itertools import repeat
from typing import Any

_ABSENT = object()  # a global the code names that is not defined (a builtin, usually)
_EMPTY = object()  # an empty closure cell

#: Rebuilding a blob this many times (what it captures keeps changing) stops the caching.
_MAX_REBUILDS = 8
_MAX_ITEMS = 64  # a captured tuple longer than this is not checked item by item: not cached
_MAX_DEPTH = 4

_ATOMIC = frozenset(
    {type(None), bool, int, float, complex, str, bytes, range, type(...), type(NotImplemented)}
)


class _Snap:
    """What one function captured when its blob was made, by identity."""

    __slots__ = (
        "annotations",
        "blob",
        "cells",
        "closure",
        "code",
        "defaults",
        "kwdefaults",
        "meta",
        "names",
        "nested",
        "rebuilds",
        "values",
    )

    def __init__(self) -> None:
        self.blob: bytes | None = None  # None: this function cannot be cached
        self.code: types.CodeType | None = None
        self.defaults: object = None
        self.kwdefaults: tuple[tuple[str, object], ...] | None = None
        self.closure: tuple[types.CellType, ...] | None = None
        self.cells: tuple[object, ...] = ()
        self.annotations: tuple[tuple[str, object], ...] = ()
        self.names: tuple[str, ...] = ()
        self.values: tuple[object, ...] = ()
        self.meta: tuple[object, ...] = ()
        self.nested: list[tuple[types.FunctionType, _Snap]] = []
        self.rebuilds = 0


_UNCACHEABLE = _Snap()
_cache: weakref.WeakKeyDictionary[types.FunctionType, _Snap] = weakref.WeakKeyDictionary()
_seen: weakref.WeakSet[types.FunctionType] = weakref.WeakSet()
_names_of: dict[types.CodeType, tuple[str, ...]] = {}
#: Names of the modules registered with ``cloudpickle.register_pickle_by_value``; ``_NO_REGISTRY``
#: until cloudpickle is imported (by us when we first need it, or by the user to register
#: one): nothing can be registered before, and a worker that never needs it does not pay
#: for importing it (~5 ms of its start).
_NO_REGISTRY: set[str] = set()
_registry: set[str] = _NO_REGISTRY


def _bound_registry() -> set[str]:
    global _registry
    if _registry is _NO_REGISTRY:
        impl = sys.modules.get("cloudpickle.cloudpickle")
        # (A module another thread is still importing may not have its registry yet: look
        # again next time rather than bind to something else.)
        registry = getattr(impl, "_PICKLE_BY_VALUE_MODULES", None)
        if isinstance(registry, set):
            _registry = registry
    return _registry


def any_registered() -> bool:
    """Whether any module was registered with ``cloudpickle.register_pickle_by_value``."""
    return bool(_registry if _registry is not _NO_REGISTRY else _bound_registry())


def by_value(module: str) -> bool:
    """Whether cloudpickle pickles the functions and classes of *module* by value:
    ``__main__``, or a module registered for it (or inside a registered package)."""
    if module == "__main__":
        return True
    registry = _bound_registry()
    while registry:
        if module in registry:
            return True
        module, dot, _ = module.rpartition(".")
        if not dot:
            break
    return False


def blob_for(fn: types.FunctionType) -> bytes | None:
    """The cached by-value pickle of *fn* (a function of a :func:`by_value` module), or None:
    pickle it the usual way this time (first use, or it captures what may change in place)."""
    snap = _cache.get(fn)
    if snap is None:
        if fn not in _seen:
            _seen.add(fn)
            return None
        snap = _build(fn, 0)
    elif snap.blob is None:
        return None
    elif not _unchanged(fn, snap):
        snap = _build(fn, snap.rebuilds + 1)
    return snap.blob


def _build(fn: types.FunctionType, rebuilds: int) -> _Snap:
    snap = _snapshot(fn, {}) if rebuilds <= _MAX_REBUILDS else None
    if snap is None:
        _cache[fn] = _UNCACHEABLE
        return _UNCACHEABLE
    import cloudpickle

    try:
        snap.blob = cloudpickle.dumps(fn, protocol=5)
    except Exception:  # the caller's own pickling pass reports it
        _cache[fn] = _UNCACHEABLE
        return _UNCACHEABLE
    snap.rebuilds = rebuilds
    _cache[fn] = snap
    return snap


def load(blob: bytes) -> Any:
    """Rebuild a function from its blob (the receiver's side; runs at unpickling).

    The blob is unpickled once into a template that is never called; each call gets a copy
    made as unpickling would make it (new globals, new closure cells, new copies of the
    by-value functions it refers to), which costs a fifth of unpickling it again.
    """
    template = _templates.get(blob)
    if template is None:
        template = _Template(pickle.loads(blob))
        if len(_templates) >= _MAX_TEMPLATES:  # the oldest goes (dicts keep insertion order)
            try:
                del _templates[next(iter(_templates))]
            except (RuntimeError, StopIteration, KeyError):
                pass  # another reader changed it meanwhile: trimmed on the next miss
        _templates[blob] = template
    return template.fresh()


_MAX_TEMPLATES = 256


class _Template:
    """A by-value function as unpickled once, and how to copy it and what it refers to.

    The sender caches a blob only if everything the function captures is immutable, pickled by
    reference, or another by-value function (see :func:`_safe`): the copies share the former
    and copy the latter, which are the functions whose globals are not their module's.
    """

    __slots__ = ("fns", "globals_", "simple")

    def __init__(self, root: types.FunctionType) -> None:
        fns: dict[int, types.FunctionType] = {}
        stack = [root]
        while stack:
            fn = stack.pop()
            if id(fn) in fns:
                continue
            fns[id(fn)] = fn
            for value in _references(fn):
                if type(value) is types.FunctionType and _dynamic(value):
                    stack.append(value)
        self.fns = list(fns.values())  # the root first
        self.globals_ = {id(fn.__globals__): fn.__globals__ for fn in self.fns}
        # One function without a closure that does not refer to itself: nothing to remap.
        self.simple = (
            len(self.fns) == 1
            and root.__closure__ is None
            and all(value is not root for value in _references(root))
        )

    def fresh(self) -> types.FunctionType:
        new_globals = {gid: dict(g) for gid, g in self.globals_.items()}
        copies: dict[int, types.FunctionType] = {}
        for fn in self.fns:
            closure = None
            if fn.__closure__ is not None:
                closure = tuple(types.CellType() for _ in fn.__closure__)
            new = types.FunctionType(
                fn.__code__, new_globals[id(fn.__globals__)], fn.__name__, None, closure
            )
            new.__qualname__ = fn.__qualname__
            new.__module__ = fn.__module__
            new.__doc__ = fn.__doc__
            copies[id(fn)] = new
        if self.simple:
            fn, new = self.fns[0], copies[id(self.fns[0])]
            new.__defaults__ = fn.__defaults__
            if fn.__kwdefaults__:
                new.__kwdefaults__ = dict(fn.__kwdefaults__)
            if fn.__annotations__:
                new.__annotations__ = dict(fn.__annotations__)
            return new
        for g in new_globals.values():
            for key, value in g.items():
                if type(value) is types.FunctionType and id(value) in copies:
                    g[key] = copies[id(value)]
        for fn in self.fns:
            new = copies[id(fn)]
            new.__defaults__ = _remap(fn.__defaults__, copies)
            if fn.__kwdefaults__:
                new.__kwdefaults__ = {k: _remap(v, copies) for k, v in fn.__kwdefaults__.items()}
            if fn.__annotations__:
                new.__annotations__ = dict(fn.__annotations__)
            if fn.__closure__ is not None:
                assert new.__closure__ is not None
                for old_cell, new_cell in zip(fn.__closure__, new.__closure__, strict=True):
                    try:
                        new_cell.cell_contents = _remap(old_cell.cell_contents, copies)
                    except ValueError:
                        pass  # an empty cell stays empty
        return copies[id(self.fns[0])]


_templates: dict[bytes, _Template] = {}


def _references(fn: types.FunctionType) -> list[object]:
    """What *fn* refers to that may be another by-value function (tuples opened)."""
    found: list[object] = list(fn.__globals__.values())
    if fn.__closure__ is not None:
        for cell in fn.__closure__:
            try:
                found.append(cell.cell_contents)
            except ValueError:
                pass
    found.extend(fn.__defaults__ or ())
    found.extend((fn.__kwdefaults__ or {}).values())
    out: list[object] = []
    while found:
        value = found.pop()
        if type(value) is tuple or type(value) is frozenset:
            found.extend(value)
        else:
            out.append(value)
    return out


def _dynamic(fn: types.FunctionType) -> bool:
    """Whether *fn* was made by unpickling (its globals are not its module's)."""
    module = sys.modules.get(fn.__module__) if isinstance(fn.__module__, str) else None
    return getattr(module, "__dict__", None) is not fn.__globals__


def _remap(value: Any, copies: dict[int, types.FunctionType]) -> Any:
    if type(value) is types.FunctionType:
        return copies.get(id(value), value)
    if type(value) is tuple:
        return tuple(_remap(v, copies) for v in value)
    if type(value) is frozenset:
        return frozenset(_remap(v, copies) for v in value)
    return value


# -- what a function captures, and whether it is still the same


def _snapshot(fn: types.FunctionType, seen: dict[int, _Snap]) -> _Snap | None:
    """Record what cloudpickle would capture of *fn*; None if any of it may change in place."""
    if fn.__dict__:
        return None  # function attributes (functools.wraps's __wrapped__, ...): not checked
    snap = _Snap()
    seen[id(fn)] = snap
    nested: list[types.FunctionType] = []
    code = fn.__code__
    snap.code = code
    snap.defaults = fn.__defaults__
    if snap.defaults is not None and not _safe(snap.defaults, nested, 0):
        return None
    kw = fn.__kwdefaults__
    if kw is not None:
        snap.kwdefaults = tuple(kw.items())
        if not all(_safe(v, nested, 0) for _k, v in snap.kwdefaults):
            return None
    snap.closure = fn.__closure__
    if snap.closure is not None:
        cells = []
        for cell in snap.closure:
            try:
                value = cell.cell_contents
            except ValueError:
                value = _EMPTY
            if value is not _EMPTY and not _safe(value, nested, 0):
                return None
            cells.append(value)
        snap.cells = tuple(cells)
    snap.annotations = tuple(fn.__annotations__.items())
    if not all(_safe(v, nested, 0) for _k, v in snap.annotations):
        return None
    snap.names = _code_names(code)
    g = fn.__globals__
    snap.values = tuple(g.get(name, _ABSENT) for name in snap.names)
    for value in snap.values:
        if value is not _ABSENT and not _safe(value, nested, 0):
            return None
    snap.meta = (fn.__name__, fn.__qualname__, fn.__module__, fn.__doc__)
    for inner in nested:
        if id(inner) in seen:  # recursion: already being recorded higher up
            continue
        inner_snap = _snapshot(inner, seen)
        if inner_snap is None:
            return None
        snap.nested.append((inner, inner_snap))
    return snap


def _unchanged(fn: types.FunctionType, snap: _Snap, checked: set[int] | None = None) -> bool:
    """Whether everything *snap* recorded of *fn* is still the very same object."""
    if (
        fn.__code__ is not snap.code
        or fn.__defaults__ is not snap.defaults
        or fn.__closure__ is not snap.closure
        or fn.__dict__
        or fn.__name__ is not snap.meta[0]
        or fn.__qualname__ is not snap.meta[1]
        or fn.__module__ is not snap.meta[2]
        or fn.__doc__ is not snap.meta[3]
    ):
        return False
    if snap.names and not all(
        map(operator.is_, map(fn.__globals__.get, snap.names, repeat(_ABSENT)), snap.values)
    ):
        return False
    if snap.cells:
        assert snap.closure is not None
        for cell, value in zip(snap.closure, snap.cells, strict=True):
            try:
                now = cell.cell_contents
            except ValueError:
                now = _EMPTY
            if now is not value:
                return False
    kw, ann = fn.__kwdefaults__, fn.__annotations__
    if (kw or snap.kwdefaults) and not _same_items(kw, snap.kwdefaults):
        return False
    if (ann or snap.annotations) and not _same_items(ann, snap.annotations):
        return False
    if not snap.nested:
        return True
    if checked is None:
        checked = set()
    checked.add(id(fn))
    return all(
        id(inner) in checked or _unchanged(inner, inner_snap, checked)
        for inner, inner_snap in snap.nested
    )


def _same_items(d: dict[str, object] | None, items: tuple[tuple[str, object], ...] | None) -> bool:
    if not d:
        return not items
    if items is None or len(d) != len(items):
        return False
    return all(d.get(k, _ABSENT) is v for k, v in items)


def _safe(value: object, nested: list[types.FunctionType], depth: int) -> bool:
    """Whether *value* pickles to the same bytes for as long as it is the same object."""
    t = type(value)
    if t in _ATOMIC:
        return True
    if t is tuple or t is frozenset:
        items: Any = value
        return (
            depth < _MAX_DEPTH
            and len(items) <= _MAX_ITEMS
            and all(_safe(v, nested, depth + 1) for v in items)
        )
    if t is types.FunctionType:
        fn: Any = value
        if isinstance(fn.__module__, str) and by_value(fn.__module__):
            nested.append(fn)  # by value too: checked in turn
            return True
        return _by_reference(fn)
    if t is types.ModuleType:
        name = getattr(value, "__name__", None)
        return name != "__main__" and name is not None and sys.modules.get(name) is value
    if t is types.BuiltinFunctionType:
        owner = getattr(value, "__self__", None)
        return (owner is None or type(owner) is types.ModuleType) and _by_reference(value)
    if isinstance(value, type):
        return _by_reference(value)
    if t is types.GenericAlias or t is types.UnionType or t.__module__ == "typing":
        args = getattr(value, "__args__", None)
        origin = getattr(value, "__origin__", None)
        return (
            depth < _MAX_DEPTH
            and isinstance(args, tuple)
            and _safe(args, nested, depth + 1)
            and (origin is None or _safe(origin, nested, depth + 1))
        )
    return False


def _by_reference(obj: Any) -> bool:
    """Whether *obj* (a function or class) is pickled by its importable name."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or by_value(module):
        return False
    if "<locals>" in qualname or "<lambda>" in qualname:
        return False
    found: object = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, _ABSENT)
    return found is obj


def _code_names(code: types.CodeType) -> tuple[str, ...]:
    """Every name *code* and the code nested in it may look up as a global (a superset:
    attribute names too, which only makes the check stricter)."""
    names = _names_of.get(code)
    if names is None:
        found: dict[str, None] = {}
        stack = [code]
        while stack:
            c = stack.pop()
            found.update(dict.fromkeys(c.co_names))
            stack.extend(k for k in c.co_consts if type(k) is types.CodeType)
        names = tuple(found)
        if len(_names_of) < 4096:
            _names_of[code] = names
    return names

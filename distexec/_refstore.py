"""Owner side of remote references: values kept for Futures, and who still holds a handle.

Layer: L4 refs. Imports: L0-L3.

A value lives here while any process holds a handle to it (Julia's ``RemoteValue`` with its
``clientset``). The creator of a Future hears when the value is ready; a small value goes
along with that notice and the creator stops counting as a client (it has its own copy),
so most values are freed the moment they are delivered. A large one stays here until someone
fetches it or the last handle is dropped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from . import _config
from ._cluster import ProcessGroup
from ._ids import RRID, WorkerId
from ._protocol import codec
from ._protocol.messages import DoneMsg, RefsMsg
from .errors import ProcessExitedException, SerializationError


@dataclass(slots=True)
class RemoteValue:
    """One value kept for remote handles."""

    clients: set[WorkerId] = field(default_factory=set)
    ready: bool = False
    ok: bool = True
    value: object = None
    #: For RemoteChannels: the channel object itself lives in ``value`` and is always ready.
    is_channel: bool = False


class RefStore:
    """The values this process owns on behalf of handles held anywhere in the group."""

    def __init__(self, group: ProcessGroup) -> None:
        self._group = group
        self._values: dict[RRID, RemoteValue] = {}
        self._cond = threading.Condition()  # guards: _values and every RemoteValue in it

    def __len__(self) -> int:
        return len(self._values)

    def client_counts(self) -> dict[RRID, int]:
        with self._cond:
            return {r: len(v.clients) for r, v in self._values.items()}

    def register(self, rrid: RRID, client: WorkerId) -> None:
        """*client* holds a handle to *rrid* (made on the first touch, Julia-style)."""
        with self._cond:
            rv = self._values.get(rrid)
            if rv is None:
                rv = self._values[rrid] = RemoteValue()
            rv.clients.add(client)

    def register_channel(self, rrid: RRID, channel: object, client: WorkerId | None) -> None:
        with self._cond:
            rv = self._values.get(rrid)
            if rv is None:
                rv = self._values[rrid] = RemoteValue(is_channel=True)
            rv.ready, rv.ok, rv.value, rv.is_channel = True, True, channel, True
            if client is not None:
                rv.clients.add(client)

    def lookup(self, rrid: RRID) -> RemoteValue | None:
        with self._cond:
            return self._values.get(rrid)

    def complete(self, rrid: RRID, creator: WorkerId, ok: bool, value: object) -> None:
        """A call behind a Future finished here; store the value and tell the creator."""
        with self._cond:
            rv = self._values.get(rrid)
            if rv is None:
                rv = self._values[rrid] = RemoteValue()
            rv.ready, rv.ok, rv.value = True, ok, value
            notify = creator in rv.clients and creator != self._group.myid
            self._cond.notify_all()
        if notify:
            inline = self._push(rrid, creator, ok, value)
            if inline:
                self.drop(rrid, creator)
        else:
            self._free_if_unheld(rrid)

    def _push(self, rrid: RRID, creator: WorkerId, ok: bool, value: object) -> bool:
        """Send the ready notice; returns whether the value went along with it."""
        try:
            parts = codec.encode(DoneMsg(rrid, ok, value, True), notify_id=rrid.id)
            size = sum(memoryview(p).nbytes for p in parts)
        except SerializationError:
            parts, size = None, 0
        if parts is None or size > _config.INLINE_RESULT_BYTES:
            # Large (or only picklable on demand): say it is ready, keep it here.
            self._group.push_done(creator, DoneMsg(rrid, ok, None, False))
            return False
        try:
            self._group.send(creator, parts)
        except Exception:
            return True  # the creator is gone: its handle is gone with it
        return True

    def _free_if_unheld(self, rrid: RRID) -> None:
        with self._cond:
            rv = self._values.get(rrid)
            if rv is not None and not rv.clients and (rv.ready or rv.is_channel):
                del self._values[rrid]

    def drop(self, rrid: RRID, client: WorkerId) -> None:
        """*client* let go of its handle (or has its own copy now)."""
        with self._cond:
            rv = self._values.get(rrid)
            if rv is None:
                return
            rv.clients.discard(client)
            if not rv.clients and (rv.ready or rv.is_channel):
                del self._values[rrid]

    def wait_value(self, rrid: RRID, timeout: float | None = None) -> RemoteValue:
        """Block until *rrid* is ready here; raises ``KeyError`` if nobody registered it."""
        with self._cond:
            rv = self._values.get(rrid)
            if rv is None:
                raise KeyError(rrid)
            if not self._cond.wait_for(lambda: rv.ready, timeout):
                raise TimeoutError(f"{rrid} not ready within {timeout} s")
            return rv

    def handle_refs(self, sender: WorkerId, msg: RefsMsg) -> None:
        for rrid, client in msg.adds:
            self.register(rrid, client)
        for rrid, client in msg.dels:
            self.drop(rrid, client)

    def drop_client_everywhere(self, client: WorkerId) -> None:
        """A process died: it holds nothing any more."""
        with self._cond:
            dead = []
            for rrid, rv in self._values.items():
                rv.clients.discard(client)
                if not rv.clients and (rv.ready or rv.is_channel):
                    dead.append(rrid)
            for rrid in dead:
                del self._values[rrid]


def fetch_owned(
    store: RefStore, rrid: RRID, client: WorkerId, release: bool
) -> tuple[bool, object]:
    """Owner side of a fetch: wait for the value, hand it out as ``(ok, value)``, and forget
    *client* if asked (it keeps its own copy from now on)."""
    try:
        rv = store.wait_value(rrid)
    except KeyError:
        raise ProcessExitedException(
            f"{rrid} is not known on its owner (it was freed or its owner restarted)", pid=-1
        ) from None
    ok, value = rv.ok, rv.value
    if release:
        store.drop(rrid, client)
    return ok, value

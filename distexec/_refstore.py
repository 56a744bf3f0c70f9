"""Owner side of remote references: values kept for Futures and RemoteChannels, and who holds them.

Layer: L4 refs. Imports: L0-L3.

A value lives here while any handle to it exists anywhere (Julia's ``RemoteValue`` with its
client set). Unlike Julia's set, clients are *counted*: every time a handle is unpickled in a
process, that process's count goes up by one, and the handle gives all its counts back when
it dies; so a handle received twice, or received again after it was dropped, can never be
freed too early or leak.

Passing a handle to a third process never races with that process's ``del``: the sender
first registers a *transfer token* here (synchronously, before the handle leaves), and the
receiver *claims* it over its own link to this owner, which therefore always arrives before
anything else the receiver says about that handle. The creator of a Future hears when its
value is ready; a small value goes along and the creator stops counting (it holds a copy).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from . import _config
from ._cluster import ProcessGroup
from ._ids import RRID, WorkerId
from ._protocol import codec
from ._protocol.messages import DoneMsg, RefsMsg
from .errors import ClusterError, FrameTooLargeError, ProcessExitedException, SerializationError

Token = tuple[int, int]


@dataclass(slots=True)
class RemoteValue:
    """One value kept for remote handles."""

    clients: Counter[WorkerId] = field(default_factory=Counter)
    tokens: dict[Token, WorkerId] = field(default_factory=dict)  # unclaimed transfers -> sender
    watchers: set[WorkerId] = field(default_factory=set)  # pushed a notice when ready
    local_watchers: list[Any] = field(default_factory=list)  # handles here, completed directly
    ready: bool = False
    ok: bool = True
    value: object = None
    is_channel: bool = False

    def held(self) -> bool:
        return bool(self.clients) or bool(self.tokens)


class RefStore:
    """The values this process owns on behalf of handles held anywhere in the group."""

    def __init__(self, group: ProcessGroup) -> None:
        self._group = group
        self._values: dict[RRID, RemoteValue] = {}
        self._cond = threading.Condition()  # guards: _values and every RemoteValue in it

    def __len__(self) -> int:
        return len(self._values)

    def client_counts(self) -> dict[RRID, dict[WorkerId, int]]:
        with self._cond:
            return {r: dict(v.clients) for r, v in self._values.items()}

    def _get(self, rrid: RRID) -> RemoteValue:
        rv = self._values.get(rrid)
        if rv is None:
            rv = self._values[rrid] = RemoteValue()
        return rv

    def _maybe_free(self, rrid: RRID, rv: RemoteValue) -> None:
        if not rv.held() and (rv.ready or rv.is_channel) and self._values.get(rrid) is rv:
            del self._values[rrid]

    # -- counting
    def register(self, rrid: RRID, client: WorkerId, n: int = 1) -> None:
        """*client* holds *n* more handles to *rrid* (the entry is made on first touch)."""
        with self._cond:
            self._get(rrid).clients[client] += n

    def register_channel(self, rrid: RRID, client: WorkerId, factory: Any = None) -> None:
        """*client* made a RemoteChannel living here; the channel itself is made on first
        use (or now, by *factory*)."""
        with self._cond:
            rv = self._get(rrid)
            rv.is_channel = True
            rv.clients[client] += 1
        self.channel(rrid, factory)  # made now, on its owner, as Julia's constructor does

    def drop(self, rrid: RRID, client: WorkerId, n: int = 1) -> None:
        """*client* let go of *n* handles (or has its own copy of the value now)."""
        with self._cond:
            rv = self._values.get(rrid)
            if rv is None:
                return
            left = rv.clients[client] - n
            if left > 0:
                rv.clients[client] = left
            else:
                del rv.clients[client]
            self._maybe_free(rrid, rv)

    def add_token(self, rrid: RRID, token: Token, sender: WorkerId) -> bool:
        """A handle to *rrid* is about to be sent somewhere: keep the value for it.

        Returns False if *rrid* is not kept here (any more): a Future's small value was
        already sent to its creator, who should send it along with the handle instead.
        """
        with self._cond:
            rv = self._values.get(rrid)
            if rv is None:
                return False
            rv.tokens[token] = sender
            return True

    def claim(self, rrid: RRID, token: Token, client: WorkerId, watch: bool) -> None:
        """*client* received the handle sent with *token*: it counts from now on."""
        with self._cond:
            rv = self._values.get(rrid)
            if rv is None:
                if watch:  # cannot happen while the token is held; say so rather than hang
                    err = ProcessExitedException(f"{rrid} was freed on its owner")
                    self._group.push_done(client, DoneMsg(rrid, False, err, True, 0))
                return
            rv.tokens.pop(token, None)
            rv.clients[client] += 1
            if not watch or rv.is_channel:
                return
            if not rv.ready:
                rv.watchers.add(client)
                return
        self._notify(rrid, client)

    def drop_token(self, rrid: RRID, token: Token) -> None:
        with self._cond:
            rv = self._values.get(rrid)
            if rv is not None:
                rv.tokens.pop(token, None)
                self._maybe_free(rrid, rv)

    def handle_refs(self, sender: WorkerId, msg: RefsMsg) -> None:
        for op in msg.ops:
            kind = op[0]
            if kind == "claim":
                _, rrid, token, watch = op
                self.claim(rrid, token, sender, watch)
            elif kind == "del":
                _, rrid, n = op
                self.drop(rrid, sender, n)
            elif kind == "drop_token":
                _, rrid, token = op
                self.drop_token(rrid, token)

    def drop_client_everywhere(self, client: WorkerId) -> None:
        """A process died: it holds nothing any more, and its unclaimed transfers are void."""
        with self._cond:
            for rrid, rv in list(self._values.items()):
                rv.clients.pop(client, None)
                rv.watchers.discard(client)
                for token, sender in list(rv.tokens.items()):
                    if sender == client:
                        del rv.tokens[token]
                self._maybe_free(rrid, rv)

    # -- values
    def complete(self, rrid: RRID, creator: WorkerId, ok: bool, value: object) -> None:
        """A call behind a Future finished here (or it was put): store the value and tell
        the creator and every process that watches it."""
        with self._cond:
            rv = self._get(rrid)
            if rv.ready:
                raise ClusterError(f"Future {rrid} can be set only once")
            rv.ready, rv.ok, rv.value = True, ok, value
            remote = {w for w in rv.watchers if w != self._group.myid}
            if creator != self._group.myid and creator in rv.clients:
                remote.add(creator)
            rv.watchers.clear()
            local, rv.local_watchers = rv.local_watchers, []
            self._cond.notify_all()
        for target in local:
            target._complete(ok, value, True, 0)
        for client in remote:
            self._notify(rrid, client, inline_ok=client == creator)
        with self._cond:
            rv2 = self._values.get(rrid)
            if rv2 is not None:
                self._maybe_free(rrid, rv2)

    def _notify(self, rrid: RRID, client: WorkerId, inline_ok: bool = False) -> None:
        """Tell *client* that *rrid* is ready. A failure, or a small value for the creator,
        goes along; then the owner stops counting *client* (it says how many it dropped)."""
        with self._cond:
            rv = self._values.get(rrid)
            if rv is None:
                return
            ok, value, n = rv.ok, rv.value, rv.clients.get(client, 0)
        if ok and not inline_ok:
            self._group.push_done(client, DoneMsg(rrid, True, None, False, 0))
            return
        parts = None
        try:
            parts = codec.encode(DoneMsg(rrid, ok, value, True, n), notify_id=rrid.id)
            if ok and sum(memoryview(p).nbytes for p in parts) > _config.INLINE_RESULT_BYTES:
                parts = None  # large: say it is ready, keep it here until fetched
        except SerializationError:
            parts = None
        if parts is None:
            self._group.push_done(client, DoneMsg(rrid, ok, None, False, 0))
            return
        self.drop(rrid, client, n)
        try:
            self._group.send(client, parts)
        except FrameTooLargeError as exc:  # over the client's frame cap: it hears why instead
            err = self._group.value_too_large(exc, client)
            self._group.push_done(client, DoneMsg(rrid, False, err, True, n))
        except Exception:
            pass  # the client is gone: its handle is gone with it

    def watch_local(self, rrid: RRID, target: Any) -> None:
        """Complete *target* (a handle in this process) when *rrid*'s value is ready here."""
        with self._cond:
            rv = self._values.get(rrid)
            if rv is None or not rv.ready:
                if rv is not None:
                    rv.local_watchers.append(target)
                return
            ok, value = rv.ok, rv.value
        target._complete(ok, value, True, 0)

    def watch(self, rrid: RRID, client: WorkerId) -> None:
        """Push a ready notice to *client* when *rrid* is ready (now, if it is)."""
        with self._cond:
            rv = self._get(rrid)
            if not rv.ready:
                rv.watchers.add(client)
                return
        self._notify(rrid, client)

    def wait_value(self, rrid: RRID, timeout: float | None = None) -> RemoteValue:
        """Block until *rrid* is ready here; raises ``KeyError`` if nobody registered it."""
        with self._cond:
            rv = self._values.get(rrid)
            if rv is None:
                raise KeyError(rrid)
            if not self._cond.wait_for(lambda: rv.ready, timeout):
                raise TimeoutError(f"{rrid} not ready within {timeout} s")
            return rv

    def lookup(self, rrid: RRID) -> RemoteValue | None:
        with self._cond:
            return self._values.get(rrid)

    def channel(self, rrid: RRID, factory: Any = None, create: bool = True) -> Any:
        """The channel object behind a RemoteChannel, made on first touch."""
        with self._cond:
            rv = self._values.get(rrid)
            if rv is not None and rv.is_channel and rv.value is not None:
                return rv.value
            if not create:
                raise ClusterError("Local instance of remote reference not found")
        obj = factory() if factory is not None else _default_channel()
        with self._cond:
            rv = self._get(rrid)
            if rv.value is None or not rv.is_channel:
                rv.is_channel, rv.ready, rv.ok, rv.value = True, True, True, obj
            return rv.value


def _default_channel() -> Any:
    from ._channel import Channel

    return Channel(1)


def fetch_owned(store: RefStore, rrid: RRID, client: WorkerId, release: int) -> tuple[bool, object]:
    """Owner side of a fetch: wait for the value, hand it out as ``(ok, value)``, and give
    back *release* of *client*'s counts (it keeps its own copy from now on)."""
    try:
        rv = store.wait_value(rrid)
    except KeyError:
        raise ProcessExitedException(
            f"{rrid} is not known on its owner (it was freed or its owner restarted)", pid=-1
        ) from None
    ok, value = rv.ok, rv.value
    if release:
        store.drop(rrid, client, release)
    return ok, value

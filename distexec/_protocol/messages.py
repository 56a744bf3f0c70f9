"""Typed messages and their wire tags.

Layer: L2 protocol. Imports: stdlib, distexec._ids.

A message's fields travel as a pickled tuple in the frame body; its class is found from the
frame header's tag, so a body that fails to unpickle can still be answered (the header says
who waits for it). Messages are slotted dataclasses, not frozen ones: building a frozen one
costs a microsecond more, on every call.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .._ids import RRID


class CallMode(enum.IntEnum):
    """What the caller wants back from a :class:`CallMsg`."""

    FETCH = 1  # reply with a ResultMsg carrying the value (remotecall_fetch)
    FUTURE = 2  # keep the value under ``rrid``; push a DoneMsg to its creator (remotecall)
    DO = 3  # no reply at all (remote_do)
    ORDERED = 4  # as FETCH, run after the ORDERED calls that arrived before it (an executor's)


_MODES = {int(m): m for m in CallMode}


@dataclass(slots=True)
class CallMsg:
    TAG: ClassVar[int] = 1
    fn: Callable[..., object]
    args: tuple[object, ...]
    kwargs: Mapping[str, object]
    mode: CallMode
    rrid: RRID | None = None
    ticket: int = -1  # an ORDERED call's turn, taken where it is received (never sent)

    def __post_init__(self) -> None:
        if type(self.mode) is int:  # decoded from the wire
            self.mode = _MODES[self.mode]


@dataclass(slots=True)
class ResultMsg:
    """The answer to a FETCH call: ``ok`` says whether ``value`` is a value or an exception."""

    TAG: ClassVar[int] = 2
    ok: bool
    value: object


@dataclass(slots=True)
class DoneMsg:
    """A Future's value is ready on its owner; ``inline`` says whether it came along, and
    ``dropped`` how many of the receiver's counts the owner gave up when it sent it."""

    TAG: ClassVar[int] = 3
    rrid: RRID
    ok: bool
    value: object
    inline: bool
    dropped: int = 0


@dataclass(slots=True)
class JoinMsg:
    """Master -> new worker: your pid, who else is in the group, and how to connect."""

    TAG: ClassVar[int] = 4
    self_pid: int
    members: tuple[tuple[int, Any], ...]  # (pid, address) of the other workers
    topology: str
    lazy: bool
    options: Mapping[str, object]


@dataclass(slots=True)
class JoinAckMsg:
    TAG: ClassVar[int] = 5
    cpu_threads: int
    ospid: int
    hostname: str


@dataclass(slots=True)
class IdentifyMsg:
    """Worker -> worker, first message on a peer link: who is dialling."""

    TAG: ClassVar[int] = 6
    from_pid: int


@dataclass(slots=True)
class RefsMsg:
    """Reference-count changes for refs owned by the receiver, applied in order:
    ``("claim", rrid, token, watch)``, ``("del", rrid, n)``, ``("drop_token", rrid, token)``."""

    TAG: ClassVar[int] = 7
    ops: tuple[tuple[Any, ...], ...]


@dataclass(slots=True)
class ExitMsg:
    TAG: ClassVar[int] = 8


@dataclass(slots=True)
class MembershipMsg:
    """Master -> worker: the group's members and their addresses, after each change."""

    TAG: ClassVar[int] = 9
    members: tuple[tuple[int, Any], ...]
    removed: tuple[int, ...]


Message = (
    CallMsg
    | ResultMsg
    | DoneMsg
    | JoinMsg
    | JoinAckMsg
    | IdentifyMsg
    | RefsMsg
    | ExitMsg
    | MembershipMsg
)

MSG_TYPES: dict[int, type[Any]] = {
    cls.TAG: cls
    for cls in (
        CallMsg,
        ResultMsg,
        DoneMsg,
        JoinMsg,
        JoinAckMsg,
        IdentifyMsg,
        RefsMsg,
        ExitMsg,
        MembershipMsg,
    )
}


_FIELD_NAMES: dict[type[Any], tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls) if f.name != "ticket")  # never sent
    for cls in MSG_TYPES.values()
}


def fields(msg: Message) -> tuple[object, ...]:
    """The message's fields in order (what goes on the wire). Calls have their own hot path
    in ``codec.encode``: the mode travels as a plain int, the function maybe by name."""
    if type(msg) is ResultMsg:
        return (msg.ok, msg.value)
    return tuple(getattr(msg, name) for name in _FIELD_NAMES[type(msg)])

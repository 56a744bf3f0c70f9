"""Machine specs for SSH workers: ``"[user@]host[:port] [bind_addr[:port]]"`` and machine files.

Layer: L0 leaf. Imports: stdlib.

Julia: ``parse_machine`` and ``load_machine_file`` (``cluster.jl``, ``managers.jl``). A machine
is a spec string, or ``(spec, count)`` with ``count`` an int or ``"auto"`` (one worker per
usable CPU of that host). IPv6 addresses go in brackets: ``"user@[::1]:22 [fd00::2]:9000"``.

Two differences from Julia, both stricter: a host or user may not start with ``-`` and may only
hold letters, digits, ``.``, ``_`` and ``-`` (a spec ends up on ssh's command line and in a
remote shell command), and ``user@[ipv6]`` is accepted where Julia rejects it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Count",
    "Machine",
    "format_machine",
    "load_machine_file",
    "merge_machines",
    "parse_machine",
]

#: How many workers to start on a machine: a number, or ``"auto"`` (its usable CPUs).
Count = int | Literal["auto"]

SPEC_FORM = "[user@]host[:port] [bind_addr[:port]]"
FILE_FORM = "[count*][user@]host[:port] [bind_addr[:port]]"

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\Z")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\$?\Z")  # ``$``: Samba machine accounts
_CHARSET = "must start with a letter, digit or '_' and hold only letters, digits, '.', '_', '-'"


@dataclass(frozen=True, slots=True)
class Machine:
    """One parsed machine spec and how many workers to start there."""

    spec: str
    """The spec in canonical form (what :func:`format_machine` gives)."""
    user: str | None
    host: str
    """Host name, IPv4 address or IPv6 address (without brackets)."""
    port: int | None
    """sshd's port, or None for ssh's default."""
    bind_addr: str | None
    """Address the workers listen on, or None: the address ssh reached the host at."""
    bind_port: int | None
    """Port of the first worker (the next ones take the following ports), or None: any."""
    count: Count = 1

    @property
    def destination(self) -> str:
        """``user@host`` or ``host``, as ssh takes it after ``--`` (IPv6 without brackets)."""
        return f"{self.user}@{self.host}" if self.user else self.host


def _bad(spec: object, why: str, form: str = SPEC_FORM) -> ValueError:
    return ValueError(f"invalid machine spec {spec!r}: {why}; expected {form!r}")


def _parse_port(spec: str, text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise _bad(spec, f"{what} {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise _bad(spec, f"{what} {port} is not in 1..65535")
    return port


def _parse_host_port(spec: str, text: str, what: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` -> (host, port)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise _bad(spec, f"{what} {text!r} has '[' without ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise _bad(spec, f"unexpected {rest!r} after ']' in {what} {text!r}")
        port = _parse_port(spec, rest[1:], f"{what} port") if rest else None
        if ":" in host:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise _bad(spec, f"{host!r} is not an IPv6 address") from None
            return host, port
    else:
        host, colon, port_text = text.partition(":")
        if ":" in port_text:
            raise _bad(spec, f"write an IPv6 {what} in brackets ([::1] or [::1]:22), not {text!r}")
        port = _parse_port(spec, port_text, f"{what} port") if colon else None
    if not host:
        raise _bad(spec, f"empty {what}")
    if not _NAME.match(host):
        raise _bad(spec, f"{what} {host!r} {_CHARSET}")
    return host, port


def parse_machine(spec: str) -> tuple[str | None, str, int | None, str | None, int | None]:
    """Split ``"[user@]host[:port] [bind_addr[:port]]"`` into its five parts.

    Returns ``(user, host, port, bind_addr, bind_port)``; a missing part is None. IPv6
    addresses are written in brackets and returned without them.

    Julia: ``parse_machine`` (host and port) plus ``launch_on_machine``'s ``split(machine)``.

    Raises:
        TypeError: *spec* is not a string.
        ValueError: *spec* is malformed; the message names it and the expected form.
    """
    if not isinstance(spec, str):
        raise TypeError(f"a machine spec must be a string, not {type(spec).__name__}")
    words = spec.split()
    if not words:
        raise _bad(spec, "it is empty")
    if len(words) > 2:
        raise _bad(spec, f"{len(words)} words where at most 2 are allowed")
    user: str | None = None
    target = words[0]
    if "@" in target:
        user, _, target = target.rpartition("@")
        if not _USER.match(user):
            raise _bad(spec, f"user {user!r} {_CHARSET}")
    host, port = _parse_host_port(spec, target, "host")
    bind_addr: str | None = None
    bind_port: int | None = None
    if len(words) == 2:
        if "@" in words[1]:
            raise _bad(spec, f"the bind address {words[1]!r} cannot have a user")
        bind_addr, bind_port = _parse_host_port(spec, words[1], "bind address")
    return user, host, port, bind_addr, bind_port


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def format_machine(
    user: str | None,
    host: str,
    port: int | None = None,
    bind_addr: str | None = None,
    bind_port: int | None = None,
) -> str:
    """The canonical spec for these parts; ``parse_machine(format_machine(*p)) == p``."""
    out = f"{user}@" if user else ""
    out += _bracket(host)
    if port is not None:
        out += f":{port}"
    if bind_addr is not None:
        out += f" {_bracket(bind_addr)}"
        if bind_port is not None:
            out += f":{bind_port}"
    return out


def _check_count(entry: object, count: object) -> Count:
    if count == "auto":
        return "auto"
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(
            f"the count in {entry!r} must be an int or 'auto', not {type(count).__name__}"
        )
    if count < 0:
        raise ValueError(f"the count in {entry!r} must not be negative")
    return count


def merge_machines(machines: Iterable[object]) -> list[Machine]:
    """Parse ``["spec", ("spec", n), ("spec", "auto"), ...]`` into :class:`Machine` records.

    Entries naming the same machine (after parsing: ``"h"`` and ``"h "`` are one machine) are
    merged, as Julia does: counts add up, and ``"auto"`` wins over numbers. Order is that of
    first appearance; machines with a count of 0 are dropped.

    Raises:
        TypeError: an entry is neither a string nor a ``(spec, count)`` pair.
        ValueError: a malformed spec, a negative count, or a fixed bind port that would
            not fit the workers (``bind_port + count - 1 > 65535``).
    """
    if isinstance(machines, (str, bytes)):
        raise TypeError("machines must be a list of specs, not a single string")
    merged: dict[tuple[object, ...], Machine] = {}
    for entry in machines:
        spec: object
        count: Count
        if isinstance(entry, str):
            spec, count = entry, 1
        elif isinstance(entry, tuple) and len(entry) == 2:
            spec, count = entry[0], _check_count(entry, entry[1])
        else:
            raise TypeError(
                f"a machine is a spec string or a (spec, count) pair, not {entry!r}; "
                f"a spec looks like {SPEC_FORM!r}"
            )
        parts = parse_machine(spec)  # type: ignore[arg-type]
        old = merged.get(parts)
        if old is not None:
            auto = "auto" in (old.count, count)
            count = "auto" if auto else int(old.count) + int(count)
        merged[parts] = Machine(format_machine(*parts), *parts, count=count)
    out = []
    for m in merged.values():
        if m.count == 0:
            continue
        if m.bind_port is not None and m.count != "auto" and m.bind_port + m.count - 1 > 65535:
            raise ValueError(
                f"machine {m.spec!r}: {m.count} workers from port {m.bind_port} go past 65535"
            )
        out.append(m)
    return out


def load_machine_file(path: str | os.PathLike[str]) -> list[tuple[str, Count]]:
    """Read a machine file: one ``[count*][user@]host[:port] [bind_addr[:port]]`` per line.

    ``count`` is a number or ``auto``; blank lines and ``#`` comments are skipped. Returns
    ``[(spec, count), ...]`` in file order (a line without ``count*`` has count 1), ready for
    ``addprocs``. Julia: ``load_machine_file`` (``julia --machine-file``).

    Raises:
        OSError: the file cannot be read.
        ValueError: a malformed line; the message gives the file, line number and form.
    """
    out: list[tuple[str, Count]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                out.append(_parse_file_line(line))
            except ValueError as exc:
                raise ValueError(f"{os.fspath(path)}:{lineno}: {exc}") from None
    return out


def _parse_file_line(line: str) -> tuple[str, Count]:
    count: Count = 1
    spec = line
    if "*" in line:
        count_text, _, spec = line.partition("*")
        count_text, spec = count_text.strip(), spec.strip()
        if count_text == "auto":
            count = "auto"
        elif count_text.isascii() and count_text.isdigit():
            count = int(count_text)
        else:
            raise ValueError(
                f"invalid count {count_text!r} in {line!r}: a number or 'auto'; "
                f"expected {FILE_FORM!r}"
            )
    try:
        parts = parse_machine(spec)
    except ValueError as exc:
        raise ValueError(f"{exc} (a line reads {FILE_FORM!r})") from None
    return format_machine(*parts), count

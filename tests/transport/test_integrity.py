"""Per-frame integrity (study row S4): MACs, sequence numbers, and which links carry them.

Real sockets throughout: two ``Connection`` objects authenticated over a socketpair (or a
TCP pair), a frame's bytes taken off the receiving socket before its reader sees them, and
changed bytes written back through the sending socket. The body of the probe message
records it if it is ever unpickled, so "refused before unpickling" is observed, not assumed.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import math
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tlscerts import make_certs

import distexec as dx
from distexec import _cluster, _config
from distexec._protocol import codec
from distexec._protocol.messages import ResultMsg
from distexec._transport import connection, framing, integrity
from distexec._transport.connection import Connection
from distexec.errors import FrameTooLargeError, ProtocolError

pytestmark = pytest.mark.timeout(60)

COOKIE = b"integrity-test-cookie"

#: Appended to each time a :class:`Tattletale` is unpickled in this process.
UNPICKLED: list[int] = []


def _record_unpickle(n: int) -> int:
    UNPICKLED.append(n)
    return n


class Tattletale:
    """Unpickles into the number it carries, and says so in ``UNPICKLED``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __reduce__(self) -> tuple[object, ...]:
        return (_record_unpickle, (self.n,))


@pytest.fixture(autouse=True)
def _fresh_tattle() -> None:
    UNPICKLED.clear()


# --------------------------------------------------------------------------- helpers


def _authenticate_pair(
    a: Any,
    b: Any,
    *,
    a_kw: dict[str, Any] | None = None,
    b_kw: dict[str, Any] | None = None,
) -> tuple[Connection, Connection]:
    """Run the handshake on both ends at once: *a* initiates, *b* responds."""
    out: dict[str, Any] = {}

    def run(name: str, sock: Any, initiator: bool, kw: dict[str, Any]) -> None:
        try:
            out[name] = connection.authenticate(
                sock, COOKIE, {"who": name}, initiator=initiator, timeout=10, peer=name, **kw
            )
        except BaseException as exc:
            out[name] = exc

    threads = [
        threading.Thread(target=run, args=("a", a, True, a_kw or {})),
        threading.Thread(target=run, args=("b", b, False, b_kw or {})),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    for name in ("a", "b"):
        if isinstance(out.get(name), BaseException):
            raise out[name]
    return out["a"], out["b"]


@pytest.fixture
def pair(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Connection, Connection]]:
    """Two connections over an AF_UNIX socketpair that asked for frame MACs."""
    monkeypatch.setenv("DISTEXEC_INTEGRITY", "frame")
    ca, cb = _authenticate_pair(*socket.socketpair())
    try:
        yield ca, cb
    finally:
        ca.close()
        cb.close()


@pytest.fixture
def plain_pair(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Connection, Connection]]:
    """The same with ``auto``: handshake-only on AF_UNIX."""
    monkeypatch.setenv("DISTEXEC_INTEGRITY", "auto")
    ca, cb = _authenticate_pair(*socket.socketpair())
    try:
        yield ca, cb
    finally:
        ca.close()
        cb.close()


def _in_thread(fn: Callable[[], object]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        assert k, "the link closed early"
        got += k
    return bytes(buf)


def _wire_size(parts: list[bytes | memoryview], mac: bool) -> int:
    return sum(memoryview(p).nbytes for p in parts) + (integrity.MAC_SIZE if mac else 0)


def _capture(sender: Connection, receiver: Connection, parts: list[bytes | memoryview]) -> bytes:
    """What *sender* writes for *parts*, taken off *receiver*'s socket before its reader."""
    t = _in_thread(lambda: sender.send(parts))
    data = _recv_exact(receiver.sock, _wire_size(parts, sender.integrity))
    t.join(10)
    return data


def _inject(sender: Connection, data: bytes) -> threading.Thread:
    """Write raw *data* into the link from *sender*'s end (around its MAC machinery)."""
    return _in_thread(lambda: sender.sock.sendall(data))


def _probe(n: int = 1, buffer_bytes: int = 100_000) -> list[bytes | memoryview]:
    """A reply whose body unpickles a Tattletale, with one out-of-band buffer."""
    value = (Tattletale(n), np.full(buffer_bytes, n % 251, np.uint8))
    return codec.encode(ResultMsg(True, value), response_id=7)


def _layout(parts: list[bytes | memoryview]) -> dict[str, int]:
    """Offsets of each region in the sealed wire bytes of *parts* (one buffer)."""
    first = memoryview(parts[0]).nbytes
    buf = memoryview(parts[1]).nbytes
    return {
        "header": 0,
        "lengths": framing.HEADER_SIZE,
        "body": framing.HEADER_SIZE + 8,
        "buffer": first,
        "mac": first + buf,
    }


# --------------------------------------------------------------------------- round trips


def test_session_key_is_derived_from_the_cookie_and_both_nonces(
    pair: tuple[Connection, Connection],
) -> None:
    ca, cb = pair
    assert ca.session_key == cb.session_key
    ni, nr = b"i" * 32, b"r" * 32
    expect = hmac.new(COOKIE, b"distexec-session" + ni + nr, hashlib.sha256).digest()
    assert integrity.session_key(COOKIE, ni, nr) == expect
    send_a, recv_a = integrity.direction_keys(ca.session_key, initiator=True)
    send_b, recv_b = integrity.direction_keys(cb.session_key, initiator=False)
    assert send_a == recv_b and send_b == recv_a and send_a != send_b


def test_round_trip_with_mac_and_out_of_band_buffers(
    pair: tuple[Connection, Connection],
) -> None:
    ca, cb = pair
    assert ca.integrity and cb.integrity
    assert ca.peer_info["mac"] is True and ca.peer_info["integrity"] == "frame"
    big = np.arange(1 << 19, dtype=np.float64)  # 4 MiB: received into its own memory
    values: list[object] = [
        "small",
        (bytes(1000), np.arange(20_000, dtype=np.int64), bytearray(b"x" * 70_000)),
        big,
    ]
    for sender, receiver in ((ca, cb), (cb, ca)):
        for seq, value in enumerate(values, start=1):
            parts = codec.encode(ResultMsg(True, value), response_id=seq)
            t = _in_thread(lambda p=parts, s=sender: s.send(p))
            frame = receiver.read()
            t.join(10)
            assert frame.flags & framing.FLAG_MAC and frame.seq == seq
            assert frame.response_id == seq
            got = codec.decode(frame)
            assert isinstance(got, ResultMsg) and got.ok
            if isinstance(value, tuple):
                assert got.value[0] == value[0]
                assert np.array_equal(got.value[1], value[1])
                assert got.value[2] == value[2]
            elif isinstance(value, np.ndarray):
                assert np.array_equal(got.value, value)
            else:
                assert got.value == value
    assert ca.bytes_sent == cb.bytes_received and cb.bytes_sent == ca.bytes_received


def _expected_mac(direction_key: bytes, data: bytes, small: bool) -> bytes:
    """A frame's MAC computed here from its definition (see ``integrity``)."""
    if not small:
        return hmac.new(direction_key, data, "sha256").digest()
    key = hmac.new(direction_key, b"distexec-frames blake2b", "sha256").digest()
    return hashlib.blake2b(data, key=key, digest_size=32, person=b"distexec-frame").digest()


@pytest.mark.parametrize(
    ("body_size", "nbufs", "small"),
    [
        (150, 0, True),
        (integrity.SMALL_MAX - framing.HEADER_SIZE, 0, True),  # the largest small frame
        (integrity.SMALL_MAX - framing.HEADER_SIZE + 1, 0, False),
        (300_000, 0, False),  # hashed and written in steps
        (None, 1, False),  # a frame with a buffer, however small
    ],
    ids=["small", "small-max", "just-over", "large", "with-buffer"],
)
def test_the_wire_is_the_plain_frame_plus_flag_seq_and_mac(
    pair: tuple[Connection, Connection], body_size: int | None, nbufs: int, small: bool
) -> None:
    ca, cb = pair
    parts = _probe() if body_size is None else framing.pack(1, 7, 0, b"x" * body_size)
    data = _capture(ca, cb, parts)
    plain = b"".join(bytes(memoryview(p)) for p in parts)
    assert len(data) == len(plain) + 32
    _, flags, got_nbufs, seq, *_ = framing.HEADER.unpack_from(data)
    assert (flags, seq, got_nbufs) == (framing.FLAG_MAC, 1, nbufs)
    assert data[framing.HEADER_SIZE : -32] == plain[framing.HEADER_SIZE :]
    key, _ = integrity.direction_keys(ca.session_key, initiator=True)
    assert hmac.compare_digest(data[-32:], _expected_mac(key, data[:-32], small))
    assert not hmac.compare_digest(data[-32:], _expected_mac(key, data[:-32], not small))


def test_a_message_without_buffers_split_in_parts_takes_the_small_mac(
    pair: tuple[Connection, Connection],
) -> None:
    """The receiver picks the MAC by the header (no buffers, small), so the sender must
    too, however the message is cut into parts."""
    ca, cb = pair
    (whole,) = framing.pack(1, 9, 0, b"split" * 40)
    t = _in_thread(functools.partial(ca.send, [whole[:40], memoryview(whole)[40:]]))
    got = cb.read()
    t.join(10)
    assert (got.response_id, bytes(got.body)) == (9, b"split" * 40)


@pytest.mark.parametrize("size", [100, integrity.SMALL_MAX - 40, integrity.SMALL_MAX + 40])
def test_frames_either_side_of_the_small_limit_arrive(
    pair: tuple[Connection, Connection], size: int
) -> None:
    ca, cb = pair
    for n in range(3):  # and their sequence numbers keep counting across the two kinds
        body = bytes([n]) * (size - framing.HEADER_SIZE + n)
        parts = framing.pack(1, n, 0, body)
        t = _in_thread(functools.partial(ca.send, parts))
        got = cb.read()
        t.join(10)
        assert (got.response_id, bytes(got.body), got.seq) == (n, body, n + 1)


# --------------------------------------------------------------------------- tampering


BAD_MAC = "frame 1 from b failed its integrity check"


@pytest.mark.parametrize(
    ("region", "offset", "bit", "error"),
    [
        ("header", 0, 0, BAD_MAC),  # the tag
        ("header", 1, 0, "frame 1 from b carries no MAC"),  # FLAG_MAC itself
        ("header", 7, 1, BAD_MAC),  # seq
        ("header", 24, 3, BAD_MAC),  # response_id
        # The buffer's length, 100000 = 0x186a0, big-endian: clearing the top bit of byte 6
        # makes it shorter (a longer one would wait for bytes that never come).
        ("lengths", 6, 7, BAD_MAC),
        ("body", 10, 0, BAD_MAC),
        ("buffer", 50_000, 6, BAD_MAC),
        ("mac", 0, 0, BAD_MAC),
        ("mac", 31, 7, BAD_MAC),
    ],
)
def test_a_flipped_bit_anywhere_fails_before_unpickling(
    pair: tuple[Connection, Connection], region: str, offset: int, bit: int, error: str
) -> None:
    ca, cb = pair
    parts = _probe()
    data = bytearray(_capture(ca, cb, parts))
    data[_layout(parts)[region] + offset] ^= 1 << bit
    t = _inject(ca, bytes(data))
    with pytest.raises(ProtocolError, match=error):
        codec.decode(cb.read())
    t.join(10)
    assert UNPICKLED == []


@pytest.mark.parametrize("region", ["body", "buffer", "mac"])
def test_a_flipped_bit_in_a_large_message_fails_before_unpickling(
    pair: tuple[Connection, Connection], region: str
) -> None:
    """A message over 256 KiB is hashed piece by piece as it is written and read; a bit
    deep inside it still fails the MAC."""
    ca, cb = pair
    parts = _probe(buffer_bytes=3 << 20)
    data = bytearray(_capture(ca, cb, parts))
    data[_layout(parts)[region] + (2_500_000 if region == "buffer" else 3)] ^= 0x10
    t = _inject(ca, bytes(data))
    with pytest.raises(ProtocolError, match=BAD_MAC):
        codec.decode(cb.read())
    t.join(10)
    assert UNPICKLED == []


def test_an_untouched_probe_is_unpickled(pair: tuple[Connection, Connection]) -> None:
    """The control for the tampering tests: the probe does report its unpickling."""
    ca, cb = pair
    for n, size in ((5, 100_000), (6, 3 << 20)):
        t = _inject(ca, _capture(ca, cb, _probe(n, size)))
        value = codec.decode(cb.read())
        t.join(10)
        assert isinstance(value, ResultMsg) and value.value[0] == n
        assert value.value[1].nbytes == size
    assert UNPICKLED == [5, 6]


def test_a_replayed_frame_is_refused(pair: tuple[Connection, Connection]) -> None:
    ca, cb = pair
    data = _capture(ca, cb, _probe(1))
    t = _inject(ca, data + data)
    codec.decode(cb.read())
    with pytest.raises(ProtocolError, match="frame 2 from b is numbered 1: a replayed"):
        codec.decode(cb.read())
    t.join(10)
    assert UNPICKLED == [1]


def test_a_dropped_frame_is_refused(pair: tuple[Connection, Connection]) -> None:
    ca, cb = pair
    _capture(ca, cb, _probe(1))  # taken off the wire: never delivered
    second = _capture(ca, cb, _probe(2))
    t = _inject(ca, second)
    with pytest.raises(ProtocolError, match="frame 1 from b is numbered 2: a replayed, lost"):
        codec.decode(cb.read())
    t.join(10)
    assert UNPICKLED == []


def test_a_frame_reflected_to_its_sender_is_refused(pair: tuple[Connection, Connection]) -> None:
    """Each direction has its own key: a's frame 1, sent back to a as b's frame 1, fails."""
    ca, cb = pair
    data = _capture(ca, cb, _probe(1))
    t = _inject(cb, data)
    with pytest.raises(ProtocolError, match="frame 1 from a failed its integrity check"):
        codec.decode(ca.read())
    t.join(10)
    assert UNPICKLED == []


def test_a_frame_without_mac_on_an_integrity_link_is_refused(
    pair: tuple[Connection, Connection],
) -> None:
    ca, cb = pair
    t = _inject(ca, b"".join(bytes(memoryview(p)) for p in _probe(1)))
    with pytest.raises(ProtocolError, match="frame 1 from b carries no MAC"):
        codec.decode(cb.read())
    t.join(10)
    assert UNPICKLED == []


def test_a_frame_from_another_link_is_refused(pair: tuple[Connection, Connection]) -> None:
    """A frame sealed for another session (same cookie, other nonces) fails here."""
    ca, cb = pair
    other_a, other_b = _authenticate_pair(*socket.socketpair())
    try:
        data = _capture(other_a, other_b, _probe(1))
    finally:
        other_a.close()
        other_b.close()
    t = _inject(ca, data)
    with pytest.raises(ProtocolError, match="failed its integrity check"):
        codec.decode(cb.read())
    t.join(10)
    assert UNPICKLED == []


def test_sequence_numbers_wrap_into_a_new_key(pair: tuple[Connection, Connection]) -> None:
    """The header holds 32 bits of the frame counter; past 2**32 frames the key changes, so
    an old frame whose low 32 bits come round again is still refused."""
    ca, cb = pair
    old = _capture(ca, cb, _probe(1))
    t = _inject(ca, old)
    codec.decode(cb.read())
    t.join(10)
    ca._send_seq = cb._reader._seq = 2**32 - 1  # as if 2**32 - 2 more frames had passed
    for n, header_seq in ((2, 2**32 - 1), (3, 0)):
        t = _in_thread(lambda n=n: ca.send(_probe(n)))
        frame = cb.read()
        t.join(10)
        assert frame.seq == header_seq
        codec.decode(frame)
    assert UNPICKLED == [1, 2, 3]
    t = _inject(ca, old)  # numbered 1 again, as frame 2**32 + 1 would be
    with pytest.raises(ProtocolError, match="failed its integrity check"):
        codec.decode(cb.read())
    t.join(10)
    assert UNPICKLED == [1, 2, 3]


# --------------------------------------------------------------------------- without MACs


def test_handshake_only_links_send_plain_frames(
    plain_pair: tuple[Connection, Connection],
) -> None:
    ca, cb = plain_pair
    assert not ca.integrity and not cb.integrity
    assert ca.peer_info["integrity"] == "auto" and ca.peer_info["mac"] is False
    parts = _probe(4)
    data = _capture(ca, cb, parts)
    assert data == b"".join(bytes(memoryview(p)) for p in parts)
    t = _inject(ca, data)
    assert codec.decode(cb.read()).value[0] == 4
    t.join(10)


def test_a_mac_frame_on_a_handshake_only_link_is_refused(
    plain_pair: tuple[Connection, Connection],
) -> None:
    ca, cb = plain_pair
    sealed = framing.seal(_probe(1), 1, integrity.keyed(b"k" * 32, 1))
    t = _inject(ca, b"".join(bytes(memoryview(p)) for p in sealed))
    with pytest.raises(ProtocolError, match="did not negotiate per-frame integrity"):
        codec.decode(cb.read())
    t.join(10)
    assert UNPICKLED == []


# --------------------------------------------------------------------------- the sender's cap


@pytest.mark.parametrize("mode", ["frame", "auto"])
def test_the_sender_refuses_a_frame_over_the_peers_cap(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Each side says its cap in its hello; a message over it raises FrameTooLargeError at
    the sender, writes nothing, uses no sequence number, and the link carries on."""
    monkeypatch.setenv("DISTEXEC_INTEGRITY", mode)
    monkeypatch.setattr(_config, "MAX_FRAME_BYTES", 64 << 10)
    ca, cb = _authenticate_pair(*socket.socketpair())
    try:
        assert ca.peer_max_frame == cb.peer_max_frame == 64 << 10
        assert ca.peer_info["max_frame"] == 64 << 10
        with pytest.raises(FrameTooLargeError, match=r"message of 100\d{3} pickled bytes"):
            ca.send(codec.encode(ResultMsg(True, bytes(100_000))))
        with pytest.raises(FrameTooLargeError, match="out-of-band buffer of 100000 bytes"):
            ca.send(codec.encode(ResultMsg(True, np.zeros(100_000, np.uint8))))
        cb.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            cb.sock.recv(1)  # nothing was written
        cb.sock.setblocking(True)
        ca.send(codec.encode(ResultMsg(True, bytes(60_000)), response_id=9))
        frame = cb.read()
        assert frame.response_id == 9 and frame.seq == (1 if mode == "frame" else 0)
        assert codec.decode(frame).value == bytes(60_000)
    finally:
        ca.close()
        cb.close()


# --------------------------------------------------------------------------- negotiation

MODES = ("auto", "frame", "handshake")

#: (mine, theirs) -> MAC? per link, both sides seeing the same link.
TABLE: dict[tuple[str, bool], dict[tuple[str, str], bool]] = {
    (link, tls): {
        (m, t): ("frame" in (m, t) or (link == "network" and not tls)) for m in MODES for t in MODES
    }
    for link in integrity.LINK_KINDS
    for tls in (False, True)
}


def test_the_negotiation_table() -> None:
    # Spelled out for the cases the study names.
    assert integrity.negotiate("auto", "auto", link="network", tls=False)
    assert not integrity.negotiate("auto", "auto", link="loopback", tls=False)
    assert not integrity.negotiate("auto", "auto", link="unix", tls=False)
    assert not integrity.negotiate("auto", "auto", link="network", tls=True)
    assert not integrity.negotiate("auto", "auto", link="stream", tls=False)
    assert integrity.negotiate("handshake", "auto", link="network", tls=False)  # no opt-out
    assert not integrity.negotiate("handshake", "auto", link="loopback", tls=False)
    assert not integrity.negotiate("handshake", "auto", link="network", tls=True)
    assert integrity.negotiate("handshake", "handshake", link="network", tls=False)  # S4
    for link in integrity.LINK_KINDS:
        for tls in (False, True):
            assert integrity.negotiate("frame", "handshake", link=link, tls=tls)
            assert integrity.negotiate("handshake", "frame", link=link, tls=tls)
    for (link, tls), table in TABLE.items():
        for (mine, theirs), expect in table.items():
            got = integrity.negotiate(mine, theirs, link=link, tls=tls)
            assert got is expect, (mine, theirs, link, tls)
            assert integrity.negotiate(theirs, mine, link=link, tls=tls) is got  # symmetric


def test_each_side_decides_from_its_own_view_and_either_wish_wins() -> None:
    """A port forward: loopback at one end, another host at the other. The side that sees
    the network wishes for MACs, and both sides agree on the ``or`` of the wishes."""
    here = integrity.wants_mac("auto", link="loopback", tls=False)
    there = integrity.wants_mac("auto", link="network", tls=False)
    assert (here, there) == (False, True)
    assert integrity.agreed(here, {"mac": there}) and integrity.agreed(there, {"mac": here})
    assert not integrity.agreed(False, {})  # a peer that does not say wishes nothing


def test_the_mode_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTEXEC_INTEGRITY", raising=False)
    assert _config.integrity_mode() == "auto"
    for value, expect in (("frame", "frame"), (" Handshake ", "handshake"), ("", "auto")):
        monkeypatch.setenv("DISTEXEC_INTEGRITY", value)
        assert _config.integrity_mode() == expect
    monkeypatch.setenv("DISTEXEC_INTEGRITY", "mac")
    with pytest.raises(ValueError, match="DISTEXEC_INTEGRITY must be one of"):
        _config.integrity_mode()
    with pytest.raises(ValueError):
        integrity.wants_mac("mac", link="network", tls=False)


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            ip = str(s.getsockname()[0])
        except OSError:
            return None
    return None if ipaddress.ip_address(ip).is_loopback else ip


def _tcp_pair(host: str) -> tuple[socket.socket, socket.socket]:
    with socket.create_server((host, 0)) as server:
        client = socket.create_connection(server.getsockname()[:2], timeout=10)
        accepted, _ = server.accept()
    client.settimeout(None)
    return client, accepted


def test_link_kinds_of_real_sockets() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert integrity.link_kind(a) == "unix"
    a, b = _tcp_pair("127.0.0.1")
    with a, b:
        assert integrity.link_kind(a) == integrity.link_kind(b) == "loopback"
    if socket.has_ipv6:
        try:
            a, b = _tcp_pair("::1")
        except OSError:
            pass
        else:
            with a, b:
                assert integrity.link_kind(a) == "loopback"
    ip = _non_loopback_ip()
    if ip is not None:
        a, b = _tcp_pair(ip)
        with a, b:
            assert integrity.link_kind(a) == integrity.link_kind(b) == "network"


@pytest.mark.parametrize(
    ("mode", "host", "tls", "expect"),
    [
        ("auto", "127.0.0.1", False, False),
        ("auto", "net", False, True),
        ("auto", "net", True, False),
        ("handshake", "net", False, True),  # no opt-out on a plain network link (S4)
        ("handshake", "127.0.0.1", False, False),  # allowed on loopback
        ("frame", "127.0.0.1", False, True),
        ("frame", "net", True, True),  # MACs inside TLS, when asked for
    ],
)
def test_negotiation_over_real_tcp_links(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str, host: str, tls: bool, expect: bool
) -> None:
    """``auto`` turns MACs on for plain TCP to a non-loopback address (here this machine's
    own, reached through the network stack), and off for loopback and TLS."""
    if host == "net":
        ip = _non_loopback_ip()
        if ip is None:
            pytest.skip("no non-loopback address on this machine")
        host = ip
    monkeypatch.setenv("DISTEXEC_INTEGRITY", mode)
    a_kw: dict[str, Any] = {}
    b_kw: dict[str, Any] = {}
    if tls:
        config = make_certs(tmp_path, host).config()
        a_kw = {
            "ssl_context": config.client_context(),
            "server_hostname": config.server_hostname(host),
        }
        b_kw = {"ssl_context": config.server_context(), "tls_server_side": True}
    ca, cb = _authenticate_pair(*_tcp_pair(host), a_kw=a_kw, b_kw=b_kw)
    try:
        assert ca.integrity is cb.integrity is expect
        for sender, receiver in ((ca, cb), (cb, ca)):
            t = _in_thread(lambda s=sender: s.send(_probe(3)))
            frame = receiver.read()
            t.join(10)
            assert bool(frame.flags & framing.FLAG_MAC) is expect
            assert codec.decode(frame).value[0] == 3
    finally:
        ca.close()
        cb.close()


# --------------------------------------------------------------------------- real workers


def _worker_link_has_mac() -> bool:
    peer = _cluster.group().peer(1)
    return peer is not None and peer.conn is not None and peer.conn.integrity


def _double(a: np.ndarray) -> np.ndarray:
    return a * 2


@pytest.mark.parametrize("side", ["master", "worker"])
def test_a_local_worker_works_with_frame_integrity(
    monkeypatch: pytest.MonkeyPatch, no_leaked_workers: None, side: str
) -> None:
    """DISTEXEC_INTEGRITY=frame on either side of a local (AF_UNIX) link is enough: calls,
    Futures and a 10 MB array each way work over MAC'd frames."""
    if side == "master":
        monkeypatch.setenv("DISTEXEC_INTEGRITY", "frame")
        (pid,) = dx.addprocs(1, env={"DISTEXEC_INTEGRITY": "auto"})
    else:
        monkeypatch.setenv("DISTEXEC_INTEGRITY", "auto")
        (pid,) = dx.addprocs(1, env={"DISTEXEC_INTEGRITY": "frame"})
    try:
        peer = _cluster.group().peer(pid)
        assert peer is not None and peer.conn is not None and peer.conn.integrity
        assert dx.remotecall_fetch(_worker_link_has_mac, pid)
        assert dx.remotecall_fetch(math.sqrt, pid, 16) == 4.0
        assert dx.remotecall(pow, pid, 2, 10).fetch(timeout=30) == 1024
        a = np.arange(10_000_000 // 8, dtype=np.float64)  # 10 MB
        assert np.array_equal(dx.remotecall_fetch(_double, pid, a), a * 2)
        assert np.array_equal(dx.remotecall(_double, pid, a).fetch(timeout=30), a * 2)
        with pytest.raises(dx.RemoteException, match="ZeroDivisionError"):
            dx.remotecall_fetch(divmod, pid, 1, 0)
        assert peer.conn.bytes_sent > 10_000_000 and peer.conn.bytes_received > 20_000_000
    finally:
        if pid in dx.workers():
            dx.rmprocs(pid)

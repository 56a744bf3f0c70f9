"""``FrameReader.poll`` and ``FLAG_WAIT``: watching for a message due any moment.

A reader that expects its next message within microseconds (the answer to a lone call, or a
sequential caller's next call) polls the socket for a while instead of sleeping, because
waking a sleeping process costs tens of microseconds on a small VM. Polling must lose
nothing, must give up after its window, must back off when it keeps seeing nothing, and the
flag that asks for it must survive sealing (per-frame MACs) without touching the body.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from distexec._transport import framing
from distexec._transport.framing import FLAG_WAIT, FrameReader
from distexec._transport.integrity import keyed
from distexec.errors import ProtocolError

pytestmark = pytest.mark.timeout(30)


def _message(body: bytes, rid: int = 7, flags: int = 0) -> bytes:
    (part,) = framing.pack(2, rid, 0, body, flags=flags)
    return bytes(part)


@pytest.fixture
def pair() -> object:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_message_sent_while_polling_is_caught(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    reader = FrameReader(b)
    sender = threading.Timer(0.005, a.sendall, (_message(b"hello"),))
    sender.start()
    started = time.monotonic()
    assert reader.poll(10.0) is True
    assert time.monotonic() - started < 5.0  # it returned when the bytes came, not at 10 s
    frame = reader.read()
    assert (frame.response_id, bytes(frame.body)) == (7, b"hello")
    sender.join()


def test_a_poll_that_sees_nothing_gives_up_and_backs_off(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    reader = FrameReader(b)
    started = time.monotonic()
    assert reader.poll(0.02) is False
    assert 0.02 <= time.monotonic() - started < 5.0
    # Data now waits, but the next polls are skipped (1 << misses of them): they say False
    # without touching the socket, and the message is read whole afterwards.
    a.sendall(_message(b"late"))
    assert reader.poll(1.0) is False
    assert reader.poll(1.0) is False
    assert reader.poll(1.0) is True  # the backoff is over: it looks, and the bytes are here
    assert bytes(reader.read().body) == b"late"
    # A hit resets the backoff: the next miss skips only two polls again.
    assert reader.poll(0.001) is False
    assert [reader.poll(0.001) for _ in range(2)] == [False, False]


def test_polling_loses_nothing_of_messages_in_a_row(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    reader = FrameReader(b)
    bodies = [bytes([i]) * (1 + 997 * i) for i in range(20)]
    a.sendall(b"".join(_message(body, rid=i + 1) for i, body in enumerate(bodies)))
    got = []
    for _ in bodies:
        assert reader.poll(1.0) is True  # staged bytes count: no system call needed
        frame = reader.read()
        got.append((frame.response_id, bytes(frame.body)))
    assert got == [(i + 1, body) for i, body in enumerate(bodies)]


def test_a_closed_peer_ends_the_poll_and_the_read_says_so(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    reader = FrameReader(b)
    a.close()
    assert reader.poll(1.0) is True
    with pytest.raises(EOFError):
        reader.read()


class _Stream:
    """Not a plain socket (as a TLS or custom stream is not): nothing to poll."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv_into(self, buf: memoryview, nbytes: int = 0, flags: int = 0) -> int:
        return self.sock.recv_into(buf, nbytes, flags)


def test_a_stream_that_is_not_a_plain_socket_is_not_polled(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    reader = FrameReader(_Stream(b))  # type: ignore[arg-type]
    a.sendall(_message(b"x"))
    assert reader.poll(1.0) is False  # it says so at once, and reads nothing
    assert bytes(reader.read().body) == b"x"


def test_flag_wait_travels_in_the_header_and_leaves_the_body_alone(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    parts = framing.pack(2, 3, 0, b"body")
    marked = framing.flagged(parts, FLAG_WAIT)
    assert bytes(parts[0]) != bytes(marked[0])  # the original parts are not changed
    assert bytes(marked[0])[framing.HEADER_SIZE :] == b"body"
    reader = FrameReader(b)
    framing.send_parts(a, parts)
    framing.send_parts(a, marked)
    first, second = reader.read(), reader.read()
    assert (first.flags, second.flags) == (0, FLAG_WAIT)
    assert bytes(first.body) == bytes(second.body) == b"body"


def test_flag_wait_survives_sealing_and_is_covered_by_the_mac(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    key = b"k" * 32
    reader = FrameReader(b)
    reader.expect_mac(key, "peer")
    parts = framing.flagged(framing.pack(2, 3, 0, b"sealed"), FLAG_WAIT)
    framing.send_parts(a, framing.seal(parts, 1, keyed(key, 1)))
    frame = reader.read()
    assert frame.flags & FLAG_WAIT and frame.flags & framing.FLAG_MAC
    assert bytes(frame.body) == b"sealed"
    # The flag is under the MAC: a frame whose flag was set on the way fails it.
    plain = framing.seal(framing.pack(2, 4, 0, b"tampered"), 2, keyed(key, 1))
    forged = bytearray(b"".join(bytes(p) for p in plain))
    forged[1] |= FLAG_WAIT
    a.sendall(forged)
    with pytest.raises(ProtocolError):
        reader.read()

"""``FrameReader.read_if_small``: an interrupted read loses nothing; a large message is left.

A thread that reads its own reply may be the main thread, where a ``KeyboardInterrupt`` can
stop a read between two ``recv_into`` calls. The reader must then resume where it stopped.
"""

from __future__ import annotations

import socket
import threading

import pytest

from distexec._transport import framing
from distexec._transport.framing import FrameReader

pytestmark = pytest.mark.timeout(30)


class _Interrupting:
    """A socket whose ``recv_into`` raises ``KeyboardInterrupt`` on chosen calls."""

    def __init__(self, sock: socket.socket, interrupt_on: set[int]) -> None:
        self.sock = sock
        self.calls = 0
        self.interrupt_on = interrupt_on

    def recv_into(self, buf: memoryview) -> int:
        self.calls += 1
        if self.calls in self.interrupt_on:
            raise KeyboardInterrupt
        return self.sock.recv_into(buf)


def _message(n: int, rid: int) -> bytes:
    body = bytes(i % 251 for i in range(n))
    (part,) = framing.pack(2, rid, 0, body)
    return bytes(part)


@pytest.mark.parametrize("cut", [3, framing.HEADER_SIZE, framing.HEADER_SIZE + 5])
def test_an_interrupted_small_read_resumes_intact(cut: int) -> None:
    a, b = socket.socketpair()
    with a, b:
        msg = _message(100, rid=41)
        sock = _Interrupting(b, interrupt_on={2})
        reader = FrameReader(sock)  # type: ignore[arg-type]
        a.sendall(msg[:cut])
        with pytest.raises(KeyboardInterrupt):
            reader.read_if_small()  # takes the first piece, is interrupted waiting for more
        assert reader.buffered
        a.sendall(msg[cut:] + _message(10, rid=42))
        first = reader.read_if_small()
        second = reader.read_if_small()
        assert first is not None and second is not None
        assert (first.response_id, bytes(first.body)) == (41, msg[framing.HEADER_SIZE :])
        assert second.response_id == 42 and second.body.nbytes == 10
        assert not reader.buffered


def test_a_large_message_is_left_for_read() -> None:
    a, b = socket.socketpair()
    with a, b:
        big = _message(framing._STAGING, rid=7)  # does not fit the staging buffer
        reader = FrameReader(b)

        def send() -> None:
            a.sendall(big + _message(5, rid=8))

        t = threading.Thread(target=send)
        t.start()
        assert reader.read_if_small() is None
        assert reader.read_if_small() is None  # asking again changes nothing
        frame = reader.read()
        assert frame.response_id == 7 and bytes(frame.body) == big[framing.HEADER_SIZE :]
        small = reader.read_if_small()
        assert small is not None and small.response_id == 8
        t.join(10)

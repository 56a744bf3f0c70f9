"""Turn messages into frames and back: cloudpickle, protocol 5, large buffers out of band.

Layer: L2 protocol. Imports: stdlib, cloudpickle, distexec.errors, messages, transport.framing.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import cloudpickle

from .._transport import framing
from ..errors import SerializationError
from . import messages
from .messages import MSG_TYPES, Message

#: Buffers smaller than this stay in the pickle stream: a frame of their own costs more.
OOB_MIN_BYTES = 64 * 1024


def dumps(obj: object) -> tuple[bytes, list[memoryview]]:
    """Pickle *obj*, returning the stream and its out-of-band buffers.

    The C pickler goes first: it is three times faster than cloudpickle and gives the same
    bytes for everything importable. Its output is kept unless it names ``__main__`` (or a
    module registered for pickling by value), the one case where pickling by reference would
    not work on the other side; anything else cloudpickle handles (lambdas, local classes)
    makes the C pickler fail. Then cloudpickle pickles it by value.

    Raises:
        SerializationError: *obj* cannot be pickled; the original error is the cause.
    """
    buffers: list[memoryview] = []

    def keep_out_of_band(pb: pickle.PickleBuffer) -> bool:
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: let pickle copy it in-band
            return True
        if raw.nbytes < OOB_MIN_BYTES:
            return True
        buffers.append(raw)
        return False

    try:
        body = pickle.dumps(obj, 5, buffer_callback=keep_out_of_band)
    except Exception:
        body = b""
    else:
        if _BY_VALUE_MARK not in body and not _by_value_modules():
            return body, buffers
    buffers.clear()
    try:
        body = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep_out_of_band)
    except Exception as exc:
        raise SerializationError(f"cannot pickle {_describe(obj)}: {exc}") from exc
    return body, buffers


_BY_VALUE_MARK = b"__main__"


def _by_value_modules() -> bool:
    """Whether any module was registered with ``cloudpickle.register_pickle_by_value``."""
    return bool(_registry)


_registry = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", ())


def _describe(obj: object) -> str:
    if isinstance(obj, tuple) and obj and callable(obj[0]):
        fn = obj[0]
        return f"the call to {getattr(fn, '__qualname__', repr(fn))!s} (its function or arguments)"
    return f"a {type(obj).__qualname__}"


def loads(body: memoryview | bytes, buffers: Sequence[memoryview] = ()) -> object:
    """Unpickle a body produced by :func:`dumps` (may run arbitrary reduce code: callers catch)."""
    return pickle.loads(body, buffers=buffers)


def encode(msg: Message, response_id: int = 0, notify_id: int = 0) -> list[bytes | memoryview]:
    """Pack *msg* into the parts of one frame. Pickling happens here, outside any send lock."""
    body, buffers = dumps(messages.fields(msg))
    return framing.pack(msg.TAG, response_id, notify_id, body, buffers)


def decode(frame: framing.Frame) -> Message:
    """Rebuild the message of *frame*. Raises whatever unpickling raises (callers reply with it)."""
    cls = MSG_TYPES.get(frame.tag)
    if cls is None:
        from ..errors import ProtocolError

        raise ProtocolError(f"unknown message tag {frame.tag}")
    if frame.tag == messages.ExitMsg.TAG:
        return messages.ExitMsg()
    values = loads(frame.body, frame.buffers)
    if not isinstance(values, tuple):
        from ..errors import ProtocolError

        raise ProtocolError(f"message body of tag {frame.tag} is not a tuple")
    msg: Message = cls(*values)
    return msg

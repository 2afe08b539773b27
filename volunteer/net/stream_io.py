"""Expert-RPC messages on libp2p streams: call-id envelope around the wire framing.

One message on a stream is ``u64 call_id`` (little-endian) followed by
``volunteer.wire.framing.pack_frames(frames)``; a reply carries the call id of its request.
The call id lets several requests be in flight on one stream and replies come back in any
order, without the transport parsing the wire header (transports move frames only).
Size checks (frame count, header bytes, total bytes) happen in ``read_frames`` before any
payload is read; a message that breaks them is answered with a typed error and the stream
is closed (its remaining bytes cannot be trusted to resynchronise).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from libp2p.abc import INetStream

from volunteer.wire.framing import pack_frames, read_frames
from volunteer.wire.limits import DEFAULT_LIMITS, WireLimits

PROTOCOL_ID = "/volunteer/expert-rpc/1.0.0"
_U64 = struct.Struct("<Q")
_READ_CHUNK = 1 << 16


class StreamClosedError(Exception):
    """The peer closed or reset the stream (EOF in the middle or between messages)."""


class BufferedStreamReader:
    """``read_exactly(n)`` over a libp2p stream that returns arbitrary chunk sizes."""

    def __init__(self, stream: INetStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            try:
                chunk = await self._stream.read(max(n - len(self._buf), _READ_CHUNK))
            except Exception as e:  # StreamEOF, StreamReset, StreamError
                raise StreamClosedError(f"stream ended: {type(e).__name__}") from None
            if not chunk:
                raise StreamClosedError("stream ended")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def encode_message(call_id: int, frames: Sequence[bytes | memoryview]) -> bytes:
    return _U64.pack(call_id) + pack_frames(frames)


async def read_call_id(reader: BufferedStreamReader) -> int:
    (call_id,) = _U64.unpack(await reader.read_exactly(8))
    return call_id


async def read_body(reader: BufferedStreamReader, limits: WireLimits = DEFAULT_LIMITS) -> list[bytes]:
    """The frames after a call id; raises TooLargeError/BadRequestError/StreamClosedError."""
    return await read_frames(reader.read_exactly, limits)

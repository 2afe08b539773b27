"""Expert-RPC messages on libp2p streams: call-id envelope around the wire framing.

One message on a stream is ``u64 call_id`` (little-endian) followed by
``volunteer.wire.framing.pack_frames(frames)``; a reply carries the call id of its request.
The call id lets several requests be in flight on one stream and replies come back in any
order, without the transport parsing the wire header (transports move frames only).

Reading is split so a server can decide before the payload arrives: ``read_call_id``,
then ``read_lengths`` (frame count, header bytes and total bytes checked against
``WireLimits``; nothing else allocated), then ``read_payload`` (each frame read straight
into its own ``bytearray``: one copy from the stream's chunks, and writable buffers let the
tensor decoder wrap them without another copy) or ``skip`` (discard in bounded chunks).
``read_body`` = lengths + payload, for clients. Deadlines are the caller's
(``trio.fail_after`` around each step); a message that breaks the limits is answered with a
typed error and the stream is closed (its remaining bytes cannot be trusted to resync).

``write_message`` sends a large reply as its prefix and then each frame (no join of the
whole message into one more buffer); small ones go out as one write.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import trio
from libp2p.abc import INetStream

from volunteer.wire.errors import BadRequestError, TooLargeError
from volunteer.wire.framing import frame_budget, pack_frames
from volunteer.wire.limits import DEFAULT_LIMITS, WireLimits

PROTOCOL_ID = "/volunteer/expert-rpc/1.0.0"
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_READ_CHUNK = 1 << 16
JOIN_MAX = 1 << 20  # replies up to this size are joined into one write


class StreamClosedError(Exception):
    """The peer closed or reset the stream (EOF in the middle or between messages)."""


class BufferedStreamReader:
    """Exact-size reads over a libp2p stream that returns arbitrary chunk sizes.

    Never holds more than one read chunk (``_READ_CHUNK``) beyond what was asked for.
    """

    def __init__(self, stream: INetStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def _chunk(self, want: int) -> bytes:
        try:
            chunk = await self._stream.read(max(want, _READ_CHUNK))
        except Exception as e:  # StreamEOF, StreamReset, StreamError
            raise StreamClosedError(f"stream ended: {type(e).__name__}") from None
        if not chunk:
            raise StreamClosedError("stream ended")
        return chunk

    async def read_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes as ``bytes`` (small reads: ids, lengths, clients' frames)."""
        if n > _READ_CHUNK:
            return bytes(await self.read_buffer(n))
        while len(self._buf) < n:
            self._buf += await self._chunk(n - len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_buffer(self, n: int) -> bytearray:
        """Exactly ``n`` bytes in a new ``bytearray`` filled in place (one copy per chunk)."""
        out = bytearray(n)
        view = memoryview(out)
        have = min(n, len(self._buf))
        if have:
            view[:have] = memoryview(self._buf)[:have]
            del self._buf[:have]
        while have < n:
            chunk = await self._chunk(n - have)
            take = min(len(chunk), n - have)
            view[have:have + take] = memoryview(chunk)[:take]
            if take < len(chunk):
                self._buf += memoryview(chunk)[take:]
            have += take
        return out

    async def skip(self, n: int) -> None:
        """Discard exactly ``n`` bytes without keeping them."""
        drop = min(n, len(self._buf))
        del self._buf[:drop]
        left = n - drop
        while left > 0:
            chunk = await self._chunk(min(left, _READ_CHUNK))
            if len(chunk) > left:
                self._buf += memoryview(chunk)[left:]
            left -= min(left, len(chunk))


def encode_message(call_id: int, frames: Sequence[bytes | memoryview]) -> bytes:
    return _U64.pack(call_id) + pack_frames(frames)


async def write_message(stream: INetStream, call_id: int,
                        frames: Sequence[bytes | memoryview]) -> None:
    """Write one message; large ones frame by frame, without joining them first."""
    views = [memoryview(f).cast("B") for f in frames]
    total = sum(v.nbytes for v in views)
    if total <= JOIN_MAX:
        await stream.write(encode_message(call_id, views))
        return
    prefix = _U64.pack(call_id) + struct.pack(f"<I{len(views)}I", len(views),
                                              *(v.nbytes for v in views))
    await stream.write(prefix)
    for v in views:
        if v.nbytes:
            await stream.write(v)  # type: ignore[arg-type]  (yamux slices it; no copy here)


async def read_call_id(reader: BufferedStreamReader) -> int:
    (call_id,) = _U64.unpack(await reader.read_exactly(8))
    return call_id


async def read_lengths(reader: BufferedStreamReader,
                       limits: WireLimits = DEFAULT_LIMITS) -> tuple[int, ...]:
    """The frame lengths of the message being read, checked before any payload is read."""
    max_frames, max_total = frame_budget(limits)
    (count,) = _U32.unpack(await reader.read_exactly(4))
    if count == 0:
        raise BadRequestError("framed message with zero frames")
    if count > max_frames:
        raise TooLargeError(f"{count} frames > {max_frames}")
    lengths = struct.unpack(f"<{count}I", await reader.read_exactly(4 * count))
    if lengths[0] > limits.max_header_bytes:
        raise TooLargeError(f"header of {lengths[0]} bytes > {limits.max_header_bytes}")
    if sum(lengths) > max_total:
        raise TooLargeError(f"message of {sum(lengths)} bytes > {max_total}")
    return lengths


async def read_payload(reader: BufferedStreamReader, lengths: Sequence[int]) -> list[bytearray]:
    """The frames whose ``lengths`` were read (each in its own writable buffer)."""
    return [await reader.read_buffer(n) if n else bytearray() for n in lengths]


async def read_body(reader: BufferedStreamReader,
                    limits: WireLimits = DEFAULT_LIMITS) -> list[bytes]:
    """The frames after a call id; raises TooLargeError/BadRequestError/StreamClosedError."""
    lengths = await read_lengths(reader, limits)
    return [await reader.read_exactly(n) if n else b"" for n in lengths]


async def reset_quietly(stream: INetStream, timeout: float = 1.0) -> None:
    """Reset ``stream``, giving up after ``timeout`` s; errors are ignored (the peer may be
    gone, which is often why we reset)."""
    with trio.move_on_after(timeout):
        try:
            await stream.reset()
        except Exception:
            pass


async def close_quietly(stream: INetStream, timeout: float = 1.0) -> None:
    """Close ``stream`` politely, giving up after ``timeout`` s; errors are ignored."""
    with trio.move_on_after(timeout):
        try:
            await stream.close()
        except Exception:
            pass

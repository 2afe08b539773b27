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
``read_call_id_nowait`` / ``read_lengths_nowait`` / ``read_payload_nowait`` do the same steps
from what is already buffered (None when it is not all there: then await the step under its
deadline), so a small message that came in one chunk costs no awaits and no deadline scopes.

``write_message`` sends a large reply as its prefix and then each frame (no join of the
whole message into one more buffer); small ones go out as one write.

Small messages take py-libp2p's yamux fast path (``libp2p_adapter.yamux_*``): a message
that fits one noise message goes out as one yamux frame without the stream's locks, and
reads take the stream's buffered bytes directly and credit the peer's send window once per
``CREDIT_BATCH`` bytes instead of once per read (py-libp2p sends a WINDOW_UPDATE frame on
every read: half the frames of a small call). Bulk bodies and every unusual state
(EOF, reset, a full send window) go through ``stream.read``/``stream.write`` as before, so
errors and yamux's window auto-tuning for large transfers are py-libp2p's own. Should an
upgrade move the internals, the fast path turns itself off (logged once) and everything
goes through the plain stream calls.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

import trio
from libp2p.abc import INetStream

from volunteer.net import libp2p_adapter as lp
from volunteer.wire.errors import BadRequestError, TooLargeError
from volunteer.wire.framing import frame_budget, pack_frames
from volunteer.wire.limits import DEFAULT_LIMITS, WireLimits

PROTOCOL_ID = "/volunteer/expert-rpc/1.0.0"
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_READ_CHUNK = 1 << 16
JOIN_MAX = 1 << 20  # replies up to this size are joined into one write
CREDIT_BATCH = 1 << 16  # bytes consumed before one window update (yamux's window: 256 KiB)
log = logging.getLogger(__name__)
_fastpath = {"on": True}  # off for good once the adapter says the internals moved


def _fastpath_failed(e: lp.Libp2pInternalsError) -> None:
    if _fastpath["on"]:
        _fastpath["on"] = False
        log.warning("yamux fast path off, using plain stream reads and writes: %s", e)


def fastpath_enabled() -> bool:
    """Whether small reads and writes take the yamux fast path (see module docstring)."""
    return _fastpath["on"]


async def write_bytes(stream: INetStream, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` on ``stream``. Writes on one stream must not overlap.

    Through the fast path, data goes out in pieces of at most ``lp.YAMUX_FAST_MAX`` bytes,
    each one yamux frame that is one noise message (py-libp2p's own frames of 64 KiB each
    become two noise messages, the second of 17 bytes); a piece the send window cannot take
    now goes through ``stream.write``, which waits for the window."""
    if _fastpath["on"]:
        try:
            if len(data) <= lp.YAMUX_FAST_MAX:
                if not await lp.yamux_write_frame(stream, data):
                    await stream.write(data)  # type: ignore[arg-type]
                return
            view = memoryview(data).cast("B")
            for at in range(0, view.nbytes, lp.YAMUX_FAST_MAX):
                piece = view[at:at + lp.YAMUX_FAST_MAX]
                if not await lp.yamux_write_frame(stream, piece):  # type: ignore[arg-type]
                    await stream.write(piece)  # type: ignore[arg-type]
            return
        except lp.Libp2pInternalsError as e:
            _fastpath_failed(e)
    await stream.write(data)  # type: ignore[arg-type]


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
        chunk = await self._fast_chunk() if want <= _READ_CHUNK and _fastpath["on"] else None
        if chunk is None:  # bulk body, or the stream is not plainly open: py-libp2p's read
            try:
                chunk = await self._stream.read(max(want, _READ_CHUNK))
            except Exception as e:  # StreamEOF, StreamReset, StreamError
                raise StreamClosedError(f"stream ended: {type(e).__name__}") from None
        if not chunk:
            raise StreamClosedError("stream ended")
        return chunk

    async def _fast_chunk(self) -> bytes | None:
        """Buffered bytes through the yamux fast path (None: use ``stream.read``)."""
        try:
            chunk = await lp.yamux_read_some(self._stream, _READ_CHUNK)
            if chunk is not None:
                try:
                    await lp.yamux_credit(self._stream, CREDIT_BATCH)
                except lp.Libp2pInternalsError:
                    raise
                except Exception:  # the connection broke: the next read says so
                    pass
            return chunk
        except lp.Libp2pInternalsError as e:
            _fastpath_failed(e)
            return None

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

    @property
    def buffered(self) -> int:
        """Bytes already read from the stream and not yet taken."""
        return len(self._buf)

    def take_nowait(self, n: int) -> bytes | None:
        """Exactly ``n`` already-buffered bytes, or None (nothing taken) if fewer are."""
        if len(self._buf) < n:
            return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
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
        await write_bytes(stream, encode_message(call_id, views))
        return
    prefix = _U64.pack(call_id) + struct.pack(f"<I{len(views)}I", len(views),
                                              *(v.nbytes for v in views))
    await write_bytes(stream, prefix)
    for v in views:
        if v.nbytes:
            await write_bytes(stream, v)  # sliced into frames; no copy of the frame here


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


def read_call_id_nowait(reader: BufferedStreamReader) -> int | None:
    """``read_call_id`` when the id is already buffered (no await, no deadline needed)."""
    got = reader.take_nowait(8)
    return None if got is None else _U64.unpack(got)[0]


def read_lengths_nowait(reader: BufferedStreamReader,
                        limits: WireLimits = DEFAULT_LIMITS) -> tuple[int, ...] | None:
    """``read_lengths`` from buffered bytes alone; None (nothing taken) when they are not
    all there yet. The same checks, in the same order, as ``read_lengths``."""
    buf = reader._buf
    if len(buf) < 4:
        return None
    max_frames, max_total = frame_budget(limits)
    (count,) = _U32.unpack_from(buf)
    if count == 0:
        raise BadRequestError("framed message with zero frames")
    if count > max_frames:
        raise TooLargeError(f"{count} frames > {max_frames}")
    if len(buf) < 4 + 4 * count:
        return None
    lengths = struct.unpack_from(f"<{count}I", buf, 4)
    del buf[:4 + 4 * count]
    if lengths[0] > limits.max_header_bytes:
        raise TooLargeError(f"header of {lengths[0]} bytes > {limits.max_header_bytes}")
    if sum(lengths) > max_total:
        raise TooLargeError(f"message of {sum(lengths)} bytes > {max_total}")
    return lengths


def read_payload_nowait(reader: BufferedStreamReader,
                        lengths: Sequence[int]) -> list[bytearray] | None:
    """``read_payload`` when the whole payload is already buffered (each frame in its own
    writable buffer); None (nothing taken) otherwise."""
    buf = reader._buf
    if len(buf) < sum(lengths):
        return None
    out, at = [], 0
    view = memoryview(buf)
    try:
        for n in lengths:
            out.append(bytearray(view[at:at + n]))
            at += n
    finally:
        view.release()
    del buf[:at]
    return out


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

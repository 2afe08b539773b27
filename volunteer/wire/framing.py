"""Length-prefixed encoding of a frame list onto a byte stream (libp2p streams).

Layout: ``u32 n`` then ``n`` x ``u32 length`` then the ``n`` frame payloads (little-endian).
All lengths come before any payload, so a reader checks the frame count, the header size
and the total size against :class:`WireLimits` *before* reading or allocating payload bytes.

Reader: ``await read_frames(read_exactly, limits)`` where ``read_exactly(n)`` returns exactly
``n`` bytes (or raises, e.g. on EOF). Raises ``TooLargeError`` / ``BadRequestError``.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable, Sequence

from volunteer.wire.errors import BadRequestError, TooLargeError
from volunteer.wire.limits import DEFAULT_LIMITS, WireLimits

_U32 = struct.Struct("<I")


def pack_frames(frames: Sequence[bytes | memoryview]) -> bytes:
    """One contiguous buffer holding the frames with their length prefixes."""
    views = [memoryview(f).cast("B") for f in frames]
    prefix = struct.pack(f"<I{len(views)}I", len(views), *(v.nbytes for v in views))
    return b"".join([prefix, *views])


def frame_budget(limits: WireLimits) -> tuple[int, int]:
    """(max frames, max total bytes) that a stream message may carry under ``limits``."""
    return limits.max_tensors + 1, limits.max_header_bytes + limits.max_bytes


async def read_frames(
    read_exactly: Callable[[int], Awaitable[bytes]], limits: WireLimits = DEFAULT_LIMITS
) -> list[bytes]:
    """Read one framed message, enforcing the limits before each allocation."""
    max_frames, max_total = frame_budget(limits)
    (count,) = _U32.unpack(await read_exactly(4))
    if count == 0:
        raise BadRequestError("framed message with zero frames")
    if count > max_frames:
        raise TooLargeError(f"{count} frames > {max_frames}")
    lengths = struct.unpack(f"<{count}I", await read_exactly(4 * count))
    if lengths[0] > limits.max_header_bytes:
        raise TooLargeError(f"header of {lengths[0]} bytes > {limits.max_header_bytes}")
    if sum(lengths) > max_total:
        raise TooLargeError(f"message of {sum(lengths)} bytes > {max_total}")
    return [await read_exactly(n) if n else b"" for n in lengths]

"""Length-prefixed framing for byte streams: round trip and limits checked before reads."""

from __future__ import annotations

import struct

import pytest
import trio

from volunteer.wire.errors import BadRequestError, TooLargeError
from volunteer.wire.framing import pack_frames, read_frames
from volunteer.wire.limits import WireLimits


class Stream:
    """A byte source that records how many bytes were requested."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.requested = 0

    async def read_exactly(self, n: int) -> bytes:
        self.requested += n
        if self.pos + n > len(self.data):
            raise EOFError("stream ended")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        await trio.lowlevel.checkpoint()
        return out


def read(data: bytes, limits: WireLimits = WireLimits()) -> tuple[list[bytes], Stream]:
    stream = Stream(data)
    frames = trio.run(read_frames, stream.read_exactly, limits)
    return frames, stream


def test_round_trip_of_several_messages_on_one_stream():
    msgs = [[b"hdr", b"", memoryview(b"x" * 1000)], [b"only"]]
    data = b"".join(pack_frames(m) for m in msgs)
    stream = Stream(data)

    async def both():
        return [await read_frames(stream.read_exactly) for _ in msgs]

    got = trio.run(both)
    assert got == [[b"hdr", b"", b"x" * 1000], [b"only"]]


def test_limits_are_checked_before_payload_is_read():
    limits = WireLimits(max_header_bytes=16, max_tensors=2, max_elements=10, max_bytes=64)
    huge = struct.pack("<II", 1, 2**31)
    with pytest.raises(TooLargeError):
        read(huge + b"x" * 10, limits)
    too_many = struct.pack("<I", 4) + struct.pack("<4I", 1, 1, 1, 1)
    with pytest.raises(TooLargeError, match="frames"):
        read(too_many, limits)
    total = struct.pack("<III", 2, 8, 100)
    with pytest.raises(TooLargeError, match="bytes"):
        frames, stream = read(total + b"y" * 108, limits)
    with pytest.raises(BadRequestError):
        read(struct.pack("<I", 0), limits)
    frames, stream = read(pack_frames([b"h" * 8, b"p" * 64]), limits)
    assert frames == [b"h" * 8, b"p" * 64] and stream.requested == 4 + 8 + 72


def test_oversized_lengths_never_trigger_a_read_of_the_payload():
    limits = WireLimits(max_header_bytes=16, max_tensors=2, max_elements=10, max_bytes=64)
    stream = Stream(struct.pack("<III", 2, 8, 2**30))
    with pytest.raises(TooLargeError):
        trio.run(read_frames, stream.read_exactly, limits)
    assert stream.requested == 12

"""The ZMTP server's frame allocation hook (``ZmqFrontend(..., alloc=...)``): every received
frame lands in the buffer it returns, requests decode from such buffers (memoryviews of numpy
arrays, as pinned host memory would be), and an allocator that returns an unusable buffer
costs its connection, never the server."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from tests.runtime.servers import make_backends, wait_for
from volunteer.runtime.limits import ServingLimits
from volunteer.runtime.runtime import Runtime
from volunteer.runtime.zmq_frontend import ZmqFrontend
from volunteer.runtime.zmtp_conn import (
    READY,
    UNINIT_MIN,
    AllocError,
    ConnLimits,
    ZmtpConn,
    _byte_view,
)
from volunteer.wire.messages import decode_reply, decode_request, encode_request
from volunteer.wire.zmtp import LONG, MORE, ZmtpConnection, ZmtpError

pytestmark = pytest.mark.timeout(60)
H = 256


class NumpyAlloc:
    """Frame buffers as memoryviews of numpy arrays (float32 where the size allows, so the
    view's format is not bytes); remembers every size and array it handed out."""

    def __init__(self, bad_size: int | None = None) -> None:
        self.sizes: list[int] = []
        self.arrays: list[np.ndarray] = []
        self.bad_size = bad_size
        self.lock = threading.Lock()

    def __call__(self, size: int) -> object:
        with self.lock:
            self.sizes.append(size)
        if size == self.bad_size:
            return bytearray(size - 1)  # a buggy allocator: one byte short
        arr = np.empty(size // 4, np.float32) if size % 4 == 0 else np.empty(size, np.uint8)
        with self.lock:
            self.arrays.append(arr)
        return memoryview(arr)


@contextlib.contextmanager
def serving(alloc: object) -> Iterator[ZmqFrontend]:
    runtime = Runtime(make_backends({"n.0": ("nop", H)}), ServingLimits())
    runtime.start()
    frontend = ZmqFrontend(runtime, alloc=alloc)  # type: ignore[arg-type]
    try:
        frontend.start()
        yield frontend
    finally:
        frontend.stop()
        runtime.stop()


def dial(fe: ZmqFrontend) -> ZmtpConnection:
    host, port = fe.endpoint.removeprefix("tcp://").rsplit(":", 1)
    return ZmtpConnection(host, int(port), time.monotonic() + 30)


def test_every_frame_is_received_into_the_custom_buffers_and_decodes() -> None:
    alloc = NumpyAlloc()
    with serving(alloc) as fe:
        conn = dial(fe)
        try:
            for rows in (1, 3, 200):  # 200 rows: 200 KiB, read with recv_into straight into place
                x = torch.randn(rows, H)
                frames = encode_request("forward", "n.0", [x], request_id=rows)
                reply = decode_reply(conn.request(frames, time.monotonic() + 30))
                assert torch.equal(reply.tensors[0], x)
                assert x.numel() * 4 in alloc.sizes  # the tensor's frame came from the hook
                assert len(frames[0]) in alloc.sizes  # and so did the header's
        finally:
            conn.close()
    assert 0 not in alloc.sizes  # empty frames need no buffer


def test_a_buffer_of_the_wrong_size_closes_only_that_connection() -> None:
    bad = 3 * H * 4  # a 3-row tensor's frame gets a buffer one byte short
    with serving(NumpyAlloc(bad_size=bad)) as fe:
        conn = dial(fe)
        with pytest.raises(ZmtpError):
            conn.request(encode_request("forward", "n.0", [torch.ones(3, H)], request_id=1),
                         time.monotonic() + 30)
        conn.close()
        wait_for(lambda: fe.stats()["connections"] == 0, what="the connection closed")
        assert fe.stats()["closed_protocol"] == 1
        conn = dial(fe)  # the server goes on
        try:
            x = torch.ones(2, H)
            reply = decode_reply(conn.request(encode_request("forward", "n.0", [x], request_id=2),
                                              time.monotonic() + 30))
            assert torch.equal(reply.tensors[0], x)
        finally:
            conn.close()


def _feed_one_message(alloc: object, frames: list) -> list:
    """Parse ``frames`` with a bare ``ZmtpConn`` (no socket) using ``alloc``; the frames it made."""
    got: list = []
    conn = ZmtpConn(object(), -1, None, ConnLimits(2**30, 16, 2**30), lambda n: None,
                    lambda n: None, 0.0, alloc)  # type: ignore[arg-type]
    conn.state = READY
    wire = bytearray()
    for i, f in enumerate(frames):
        body = bytes(memoryview(f).cast("B"))
        more = MORE if i < len(frames) - 1 else 0
        wire += (bytes((more, len(body))) if len(body) < 256
                 else bytes((more | LONG,)) + len(body).to_bytes(8, "big")) + body
    for i in range(0, len(wire), 1000):  # in pieces, as reads split it
        chunk = memoryview(wire)[i : i + 1000]
        conn.feed(chunk, len(chunk), lambda c, fr, held, refusal: got.extend(fr))
    return got


def test_requests_decode_from_numpy_backed_frames_without_a_copy() -> None:
    alloc = NumpyAlloc()
    x = torch.randn(5, H)
    frames = _feed_one_message(alloc, encode_request("forward", "n.0", [x], request_id=7))
    assert [f.format for f in frames] == ["B", "B"]  # flat byte views of the float32 arrays
    req = decode_request(frames)
    assert req.request_id == 7 and torch.equal(req.tensors[0], x)
    # the tensor wraps the allocator's memory: writing through it shows in the numpy array
    arr = next(a for a in alloc.arrays if a.nbytes == x.numel() * 4)
    req.tensors[0][0, 0] = 12345.0
    assert arr[0] == 12345.0


def test_decoding_accepts_a_non_byte_memoryview_of_numpy_memory() -> None:
    x = torch.randn(4, H)
    header, body = encode_request("forward", "n.0", [x], request_id=3)
    arr = np.frombuffer(bytearray(memoryview(body).cast("B")), dtype=np.float32).copy()
    req = decode_request([header, memoryview(arr)])  # format "f", not bytes
    assert torch.equal(req.tensors[0], x)
    req.tensors[0][0, 0] = -1.0
    assert arr[0] == -1.0  # wrapped, not copied


@pytest.mark.parametrize("make", [
    lambda n: bytes(n),  # read-only
    lambda n: bytearray(n + 1),  # too large
    lambda n: memoryview(np.empty((n // 4, 2), np.float32)[:, 0]),  # not contiguous
])
def test_unusable_buffers_are_an_alloc_error(make) -> None:
    with pytest.raises(AllocError):
        _byte_view(make(64), 64)


def test_the_default_gives_small_frames_a_bytearray_and_large_ones_numpy_memory() -> None:
    small, large = 2, UNINIT_MIN // (4 * H) + 1  # rows
    frames = _feed_one_message(None, encode_request("forward", "n.0", [torch.ones(small, H)],
                                                    request_id=1))
    assert all(isinstance(f.obj, bytearray) for f in frames)
    x = torch.randn(large, H)
    frames = _feed_one_message(None, encode_request("forward", "n.0", [x], request_id=2))
    assert isinstance(frames[0].obj, bytearray) and isinstance(frames[1].obj, np.ndarray)
    assert torch.equal(decode_request(frames).tensors[0], x)  # every byte was received

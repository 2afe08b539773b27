"""The yamux fast path of ``stream_io`` / ``libp2p_adapter`` on real libp2p hosts (loopback).

Small messages go out as one yamux frame and reads credit the sender's window once per
``CREDIT_BATCH`` bytes instead of once per read. What must hold whatever the timing: every
byte arrives intact and in order (small, large and mixed messages on one stream), both
ends agree on the window once the updates are delivered, the sender's window is not
credited per read but once a batch is consumed, EOF and reset still surface as
``StreamClosedError``, anything that is not a py-libp2p yamux stream takes the plain path,
and internals that moved turn the fast path off instead of breaking the stream. These
tests are also the tripwire for the adapter's yamux reaches (a py-libp2p upgrade that moves
them fails here). No timing asserts.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import multiaddr
import pytest
import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.stream.net_stream import NetStream
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH as NOISE_MAX_PLAINTEXT
from libp2p.stream_muxer.yamux.yamux import YamuxStream

from tests.net.swarm_helpers import wait_for
from volunteer.net import libp2p_adapter as lp
from volunteer.net import stream_io
from volunteer.net.host import build_host, run_host
from volunteer.net.stream_io import (
    CREDIT_BATCH,
    BufferedStreamReader,
    StreamClosedError,
    encode_message,
    read_body,
    read_call_id,
    write_bytes,
    write_message,
)

PROTO = "/volunteer/test-fastpath/1"
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def connected_pair(handler) -> AsyncIterator[tuple[NetStream, list[NetStream]]]:
    """Two hosts on loopback; the second opens a stream to the first, whose handler gets
    the inbound end (also appended to the list yielded, for the test to look at)."""
    server, client = build_host(create_new_key_pair()), build_host(create_new_key_pair())
    inbound: list[NetStream] = []

    async def serve(stream: NetStream) -> None:
        inbound.append(stream)
        await handler(stream)

    async with run_host(server, LOOPBACK), run_host(client, LOOPBACK):
        server.set_stream_handler(PROTO, serve)
        addrs = [multiaddr.Multiaddr(str(a)) for a in server.get_addrs()]
        await client.connect(PeerInfo(server.get_id(), addrs))
        stream = await client.new_stream(server.get_id(), [PROTO])
        try:
            yield stream, inbound
        finally:
            await stream_io.reset_quietly(stream)


async def echo(stream: NetStream) -> None:
    """Answer each message with the same frames, through the same fast path."""
    reader = BufferedStreamReader(stream)
    try:
        while True:
            call_id = await read_call_id(reader)
            await write_message(stream, call_id, await read_body(reader))
    except StreamClosedError:
        pass


def yamux_of(stream: NetStream) -> YamuxStream:
    muxed = stream.muxed_stream
    assert isinstance(muxed, YamuxStream)
    return muxed


def test_messages_of_every_size_arrive_intact_and_the_windows_agree() -> None:
    rng = random.Random(0)
    # small (fast path), one noise message exactly, just over it, and bulk (plain path)
    sizes = [1, 300, lp.YAMUX_FAST_MAX - 40, lp.YAMUX_FAST_MAX, 70_000, 1 << 20, 5, 2_000,
             3 << 20]  # the last one over JOIN_MAX: prefix, then each frame in pieces
    sizes += [rng.randrange(1, 3_000) for _ in range(300)]  # > CREDIT_BATCH in all

    async def main() -> None:
        async with connected_pair(echo) as (stream, inbound):
            assert lp.has_yamux_fastpath(stream) and stream_io.fastpath_enabled()
            reader = BufferedStreamReader(stream)
            for i, size in enumerate(sizes):
                payload = rng.randbytes(size)
                await write_message(stream, i, [b"h%d" % i, payload])
                assert await read_call_id(reader) == i
                assert await read_body(reader) == [b"h%d" % i, payload]
            # each side's send window is what the other side granted, once updates land
            ours, theirs = yamux_of(stream), yamux_of(inbound[0])
            await wait_for(lambda: ours.send_window == theirs.recv_window
                           and theirs.send_window == ours.recv_window)
            assert stream_io.fastpath_enabled()

    trio.run(main)


def test_every_frame_written_is_one_noise_message() -> None:
    """py-libp2p's own yamux frames of a bulk write are 64 KiB + 12 bytes: two noise
    messages each (at most 65519 bytes of plaintext per message). Ours fit one."""

    async def main() -> None:
        async with connected_pair(echo) as (stream, _):
            secured = yamux_of(stream).conn.secured_conn
            plain_write, sizes = secured.write, []

            async def recording_write(data: bytes) -> None:
                sizes.append(len(data))
                await plain_write(data)

            secured.write = recording_write  # this connection's writes, for this test
            reader = BufferedStreamReader(stream)
            payload = random.Random(1).randbytes(3 << 20)
            await write_message(stream, 1, [b"h", payload])
            assert await read_call_id(reader) == 1
            assert await read_body(reader) == [b"h", payload]
            assert sum(sizes) > len(payload)  # it all went through the recorder
            assert max(sizes) <= NOISE_MAX_PLAINTEXT

    trio.run(main)


def test_reads_credit_the_window_once_per_batch_not_per_read() -> None:
    small = 1_000
    got: list[bytes] = []
    reading = trio.Semaphore(0)  # one permit per message the handler may read

    async def handler(stream: NetStream) -> None:
        reader = BufferedStreamReader(stream)
        try:
            while True:
                await reading.acquire()
                got.append(await reader.read_exactly(small))
        except StreamClosedError:
            pass

    async def main() -> None:
        async with connected_pair(handler) as (stream, _):
            ours = yamux_of(stream)
            start = ours.send_window
            per_batch = CREDIT_BATCH // small  # messages read before a credit is due
            for i in range(per_batch - 1):
                await write_bytes(stream, bytes([i % 256]) * small)
                reading.release()
                await wait_for(lambda n=i + 1: len(got) == n)
            # read but not credited: the peer's window shrank by every byte sent so far
            await trio.testing.wait_all_tasks_blocked()
            assert ours.send_window == start - (per_batch - 1) * small
            for i in range(per_batch - 1, per_batch + 1):
                await write_bytes(stream, bytes([i % 256]) * small)
                reading.release()
            # a batch consumed: one update gives everything back
            await wait_for(lambda: ours.send_window == start)
            assert got == [bytes([i % 256]) * small for i in range(per_batch + 1)]

    trio.run(main)


def test_eof_and_reset_surface_as_stream_closed() -> None:
    async def close_after_one(stream: NetStream) -> None:
        await write_bytes(stream, b"last words")
        await stream.close()

    async def reset_on_first_byte(stream: NetStream) -> None:
        await stream.read(1)
        await stream.reset()

    async def main() -> None:
        async with connected_pair(close_after_one) as (stream, _):
            reader = BufferedStreamReader(stream)
            assert await reader.read_exactly(10) == b"last words"  # buffered data first
            with pytest.raises(StreamClosedError):
                await reader.read_exactly(1)
        async with connected_pair(reset_on_first_byte) as (stream, _):
            reader = BufferedStreamReader(stream)
            await write_bytes(stream, b"?")
            with pytest.raises(StreamClosedError):  # waiting in the fast path when it comes
                await reader.read_exactly(1)
        assert stream_io.fastpath_enabled()

    trio.run(main)


def test_writes_the_fast_path_cannot_take_go_through_the_stream() -> None:
    async def main() -> None:
        async with connected_pair(echo) as (stream, _):
            ours = yamux_of(stream)
            big = b"x" * (lp.YAMUX_FAST_MAX + 1)
            assert not await lp.yamux_write_frame(stream, big)  # over one noise message
            assert not await lp.yamux_write_frame(stream, b"")
            window = ours.send_window
            ours.send_window = 10  # as if the peer had not credited us yet
            assert not await lp.yamux_write_frame(stream, b"y" * 11)
            assert ours.send_window == 10  # nothing was sent or counted
            ours.send_window = window
            # write_message falls back to stream.write for those and the data still arrives
            reader = BufferedStreamReader(stream)
            await write_message(stream, 1, [big])
            assert await read_call_id(reader) == 1 and await read_body(reader) == [big]

    trio.run(main)


class _FakeStream:
    """Not a py-libp2p stream: the fast path must leave it alone (and stay on)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.written: list[bytes] = []

    async def read(self, n: int) -> bytes:
        out, self.data = self.data[:n], self.data[n:]
        return out

    async def write(self, data: bytes) -> None:
        self.written.append(bytes(data))


def test_a_stream_that_is_not_yamux_takes_the_plain_path() -> None:
    async def main() -> None:
        fake = _FakeStream(encode_message(3, [b"hi"]))
        assert await lp.yamux_read_some(fake, 10) is None  # type: ignore[arg-type]
        assert not await lp.yamux_write_frame(fake, b"x")  # type: ignore[arg-type]
        assert await lp.yamux_credit(fake, 1) == 0  # type: ignore[arg-type]
        reader = BufferedStreamReader(fake)  # type: ignore[arg-type]
        assert await read_call_id(reader) == 3 and await read_body(reader) == [b"hi"]
        await write_bytes(fake, b"plain")  # type: ignore[arg-type]
        assert fake.written == [b"plain"]
        assert stream_io.fastpath_enabled()

    trio.run(main)


def test_internals_that_moved_turn_the_fast_path_off_not_the_stream(monkeypatch) -> None:
    """A NetStream over a yamux stream without the 0.8.1 internals (as after an upgrade
    that renamed them): a typed adapter error, then plain reads for good."""
    monkeypatch.setitem(stream_io._fastpath, "on", True)
    stream = object.__new__(NetStream)
    stream.muxed_stream = object.__new__(YamuxStream)  # no attributes at all
    with pytest.raises(lp.Libp2pInternalsError, match="fast path"):
        lp.has_yamux_fastpath(stream)

    async def plain_read(n: int) -> bytes:
        return b"\x07" + b"\0" * 7

    stream.read = plain_read  # type: ignore[method-assign]

    async def main() -> None:
        with pytest.raises(lp.Libp2pInternalsError):
            await lp.yamux_read_some(stream, 8)
        assert await read_call_id(BufferedStreamReader(stream)) == 7  # plain read did it
        assert not stream_io.fastpath_enabled()

    trio.run(main)

"""``RpcClient``'s reply reader bounds what a server's replies can cost, whatever the callers'
timeouts: a reply that starts and then trickles loses its stream within the reader's own
deadline (the caller, willing to wait much longer, gets ``UnreachableError``, not a timeout);
a reply nobody waits for is discarded unread and the stream goes on; a reply declared over
the client's limits drops the stream before anything is allocated.

Real libp2p hosts on loopback; the "server" is a hand-written handler that misbehaves on
purpose. No timing asserts (the reader's deadline is a second; callers allow a minute).
"""

from __future__ import annotations

import struct

import pytest
import trio

from tests.net.swarm_helpers import swarm, wait_for
from volunteer.net.rpc_client import RpcClient
from volunteer.net.stream_io import (
    BufferedStreamReader,
    StreamClosedError,
    encode_message,
    read_body,
    read_call_id,
)
from volunteer.wire.errors import UnreachableError
from volunteer.wire.limits import WireLimits

PROTO = "/volunteer/test-reply-deadline/1"
LIMITS = WireLimits(max_header_bytes=1024, max_tensors=4, max_elements=2**22, max_bytes=4 << 20)
CALLER_TIMEOUT = 60.0  # far longer than the reader's deadline below
pytestmark = pytest.mark.timeout(90)


def serve(host, answer) -> None:
    """Install a handler that calls ``answer(stream, call_id, frames)`` for each request."""

    async def handler(stream) -> None:
        reader = BufferedStreamReader(stream)
        try:
            while True:
                call_id = await read_call_id(reader)
                frames = await read_body(reader)
                await answer(stream, call_id, frames)
        except (StreamClosedError, Exception):
            pass

    host.set_stream_handler(PROTO, handler)


def client(host, nursery) -> RpcClient:
    return RpcClient(host, nursery, LIMITS, max_streams=1, protocol=PROTO,
                     reply_timeout_s=1.0, min_reply_rate=1 << 20)


def test_a_trickling_reply_loses_its_stream_within_the_readers_deadline(tmp_path):
    async def trickle(stream, call_id, frames):
        # declares a 1 MiB payload, sends 10 bytes of it, then nothing (the connection stays)
        await stream.write(struct.pack("<QIII", call_id, 2, 2, 1 << 20) + b"ok" + b"x" * 10)
        await trio.sleep_forever()

    async def main():
        async with swarm(tmp_path, 2) as (a, b), trio.open_nursery() as nursery:
            serve(a.host, trickle)
            rpc = client(b.host, nursery)
            with pytest.raises(UnreachableError):
                await rpc.call(a.peer_id, a.multiaddrs(), [b"hello"], CALLER_TIMEOUT)
            assert rpc.stats.reply_timeouts == 1 and rpc.stats.timeouts == 0
            await rpc.close()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_reply_nobody_waits_for_is_dropped_and_the_stream_goes_on(tmp_path):
    async def stray_then_answer(stream, call_id, frames):
        await stream.write(encode_message(call_id + 1000, [b"h", b"\0" * (1 << 20)]))  # unknown id
        await stream.write(encode_message(call_id, [b"ok", bytes(frames[0])]))

    async def main():
        async with swarm(tmp_path, 2) as (a, b), trio.open_nursery() as nursery:
            serve(a.host, stray_then_answer)
            rpc = client(b.host, nursery)
            for word in (b"one", b"two"):
                got = await rpc.call(a.peer_id, a.multiaddrs(), [word], CALLER_TIMEOUT)
                assert got == [b"ok", word]
            assert rpc.stats.replies_dropped == 2 and rpc.stats.streams_opened == 1
            await rpc.close()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_reply_over_the_limits_drops_the_stream_unread(tmp_path):
    async def oversize(stream, call_id, frames):
        await stream.write(struct.pack("<QIII", call_id, 2, 16, 1 << 30))

    async def main():
        async with swarm(tmp_path, 2) as (a, b), trio.open_nursery() as nursery:
            serve(a.host, oversize)
            rpc = client(b.host, nursery)
            with pytest.raises(UnreachableError):
                await rpc.call(a.peer_id, a.multiaddrs(), [b"hello"], CALLER_TIMEOUT)
            await wait_for(lambda: all(c.broken for c in rpc._pools.get(a.peer_id, [])))
            assert rpc.stats.reply_timeouts == 0 and rpc.stats.timeouts == 0
            await rpc.close()
            nursery.cancel_scope.cancel()

    trio.run(main)

"""``ShardNetwork``'s shard server on real libp2p hosts (loopback): requests are tiny while
each holds a chunk reply until written, so the server's byte budget caps the requests held
in flight, all peers together (``shard_inflight_bytes``), and ``SHARD_PEER_LIMITS`` caps one
peer; requests beyond either are answered ``overloaded`` at once (a typed
``ShardRequestError`` on the asking side). The ZeroMQ transport factory can be set from
another thread, and ``close`` stops the pool. No timing asserts: chunk reads block on an
event the test releases."""

from __future__ import annotations

import threading

import pytest
import trio

from tests.net.swarm_helpers import swarm, wait_for
from volunteer.net.peer_limits import SHARD_PEER_LIMITS, PeerLimits
from volunteer.net.shard_network import ShardNetwork, shard_inflight_bytes
from volunteer.net.shard_rpc import (
    REPLY_LIMITS,
    SHARD_PROTOCOL_ID,
    ShardRequest,
    ShardRequestError,
    ShardServer,
    decode_reply,
    encode_request,
)
from volunteer.net.stream_io import BufferedStreamReader, encode_message, read_body, read_call_id
from volunteer.runtime.limits import ServingLimits
from volunteer.wire.errors import UnreachableError

pytestmark = pytest.mark.timeout(120)
ROOT = bytes(range(32))
CHUNK = b"c" * 4096


class BlockingCache:
    """A ``ShardCache`` stand-in whose chunk reads wait until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def header(self, root: bytes):
        return type("H", (), {"uid": "x", "raw": b"header"})() if root == ROOT else None

    def has_complete(self, root: bytes) -> bool:
        return root == ROOT

    def read_chunk(self, root: bytes, index: int) -> bytes:
        self.release.wait(60)
        return CHUNK


async def flood(host, peer, streams: int, per_stream: int, results: list[str]) -> None:
    """Send ``streams`` x ``per_stream`` chunk requests at once; append each reply's code."""

    async def one_stream(s: int) -> None:
        stream = await host.new_stream(peer, [SHARD_PROTOCOL_ID])
        for i in range(per_stream):
            req = encode_request(ShardRequest("chunk", "x", ROOT, s * per_stream + i))
            await stream.write(encode_message(s * per_stream + i + 1, req))
        reader = BufferedStreamReader(stream)
        for _ in range(per_stream):
            await read_call_id(reader)
            try:
                _status, payload = decode_reply(await read_body(reader, REPLY_LIMITS))
                results.append("ok" if payload == CHUNK else "bad")
            except ShardRequestError as e:
                results.append(e.code)
        await stream.close()

    async with trio.open_nursery() as nursery:
        for s in range(streams):
            nursery.start_soon(one_stream, s)


def run_flood(tmp_path, streams: int, per_stream: int, **network_kw) -> tuple[list[str], int]:
    """Flood one ``ShardNetwork``'s server from one peer; (reply codes, requests that were
    held in flight at once before the chunk reads were released)."""
    cache = BlockingCache()
    server = ShardServer(cache, workers=2)
    results: list[str] = []
    held: list[int] = []

    async def main():
        async with swarm(tmp_path, 2) as (a, b), trio.open_nursery() as nursery:
            net = ShardNetwork(None, a.host, nursery, None, None, server, **network_kw)
            rpc = net.rpc_server
            req_len = len(encode_request(ShardRequest("chunk", "x", ROOT, 0))[0])
            total = streams * per_stream
            try:
                async with trio.open_nursery() as inner:
                    inner.start_soon(flood, b.host, a.peer_id, streams, per_stream, results)
                    # every request is either refused at once or held (its read blocks)
                    await wait_for(lambda: len(results) + rpc.budget.held // req_len == total)
                    held.append(rpc.budget.held // req_len)
                    assert all(code == "overloaded" for code in results)
                    cache.release.set()
            finally:
                cache.release.set()
            await net.rpc.close()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        server.close()
    return results, held[0]


def test_the_byte_budget_caps_requests_in_flight_for_all_peers(tmp_path):
    limits = ServingLimits(max_queued_bytes=1 << 20)  # -> the smallest shard budget
    req_len = len(encode_request(ShardRequest("chunk", "x", ROOT, 0))[0])
    cap = shard_inflight_bytes(1 << 20) // req_len
    results, held = run_flood(tmp_path, 4, 16, limits=limits,
                              peer_limits=PeerLimits(max_concurrent=1000))
    assert 0 < cap < 64 and held == cap
    assert results.count("ok") == cap and results.count("overloaded") == 64 - cap


def test_one_peer_is_capped_by_the_shard_peer_limits(tmp_path):
    results, held = run_flood(tmp_path, 2, 16)
    assert held == SHARD_PEER_LIMITS.max_concurrent < 32
    assert results.count("ok") == held and results.count("overloaded") == 32 - held


class FakeTransport:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_direct_transport_set_from_another_thread_and_closed():
    net = ShardNetwork(None, None, None, None, None, None)  # no server: no host needed
    assert net.direct_transport is None
    with pytest.raises(UnreachableError):
        net.transport("tcp://127.0.0.1:1")
    setter = threading.Thread(target=net.set_direct_transport, args=(FakeTransport,))
    setter.start()
    setter.join()
    assert net.direct_transport is FakeTransport
    t = net.transport("tcp://127.0.0.1:1")
    assert net.transport("tcp://127.0.0.1:1") is t and t.endpoint == "tcp://127.0.0.1:1"
    net.close()
    assert t.closed and net.direct_transport is None
    with pytest.raises(UnreachableError):
        net.transport("tcp://127.0.0.1:1")

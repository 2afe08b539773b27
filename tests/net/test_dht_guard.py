"""The DHT guard on real libp2p nodes (loopback): a flooding peer is rate-limited (its
stream reset) while a polite peer's FIND_NODE is still answered; too many streams from one
peer, an oversized message and an idle stream are refused without touching py-libp2p's
handler slots for long; lookups are bounded in rounds, time and candidates. No timing
asserts (the lookup deadline runs on trio's mock clock)."""

from __future__ import annotations

import itertools

import pytest
import trio
import varint
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from libp2p.utils.varint import read_varint_prefixed_bytes_limited
from trio.testing import MockClock

from tests.net.swarm_helpers import swarm, wait_for
from volunteer.net.dht_guard import install_dht_guard
from volunteer.net.dht_rpc import DhtSessions, LookupBounds, find_node, run_lookup
from volunteer.net.peer_limits import PeerLimits

pytestmark = pytest.mark.timeout(90)


def find_node_msg(key: bytes) -> bytes:
    msg = Message()
    msg.type = Message.MessageType.FIND_NODE
    msg.key = key
    data = msg.SerializeToString()
    return varint.encode(len(data)) + data


async def replies_until_end(stream, limit: int) -> int:
    """How many replies the server wrote before it ended the stream."""
    got = 0
    try:
        while got < limit:
            await read_varint_prefixed_bytes_limited(stream, 1 << 22)
            got += 1
    except Exception:
        pass
    return got


async def try_open(host, peer):
    """A KAD stream, or None when the server reset it while it was being negotiated."""
    try:
        return await host.new_stream(peer, [KAD_PROTOCOL_ID])
    except Exception:
        return None


def test_flooding_peer_is_cut_off_while_a_polite_peer_is_answered(tmp_path):
    limits = PeerLimits(requests_per_s=0.01, burst=20, max_concurrent=2, idle_timeout_s=60.0)

    async def main():
        async with swarm(tmp_path, 3) as (a, flooder, polite):
            guard = install_dht_guard(a.host, a.dht, limits)
            assert install_dht_guard(a.host, a.dht) is guard  # idempotent
            key = polite.peer_id.to_bytes()
            s = await flooder.host.new_stream(a.peer_id, [KAD_PROTOCOL_ID])
            await s.write(b"".join(find_node_msg(key) for _ in range(100)))
            answered = await replies_until_end(s, 100)
            assert answered <= 21 and guard.stats.rate_limited >= 1
            # its bucket is empty: a fresh stream is reset (during or right after opening)
            refused = guard.stats.streams_refused
            s2 = await try_open(flooder.host, a.peer_id)
            if s2 is not None:
                try:
                    await s2.write(find_node_msg(key))
                except Exception:
                    pass
                assert await replies_until_end(s2, 1) == 0
            await wait_for(lambda: guard.stats.streams_refused == refused + 1)
            # the polite peer is served as before
            sessions = DhtSessions(polite.host)
            for _ in range(3):
                peers = await find_node(sessions, a.peer_id, flooder.peer_id.to_bytes())
                assert isinstance(peers, list)
            await sessions.close()
            assert guard.stats.messages >= answered + 3

    trio.run(main)


def test_streams_per_peer_size_and_idle_are_bounded(tmp_path):
    limits = PeerLimits(burst=100, max_concurrent=2, idle_timeout_s=0.5)

    async def main():
        async with swarm(tmp_path, 2) as (a, b):
            guard = install_dht_guard(a.host, a.dht, limits, max_message_bytes=64 * 1024)
            # an oversized message: refused from its length prefix, the body never sent
            big = await b.host.new_stream(a.peer_id, [KAD_PROTOCOL_ID])
            await big.write(varint.encode(100 << 20))
            assert await replies_until_end(big, 1) == 0
            await wait_for(lambda: guard.stats.too_large == 1)
            # streams beyond max_concurrent are reset at once; idle ones close by themselves
            streams = [await try_open(b.host, a.peer_id) for _ in range(3)]
            await wait_for(lambda: guard.stats.streams_refused >= 1)
            for s in streams:
                if s is not None:
                    assert await replies_until_end(s, 1) == 0
            await wait_for(lambda: guard.peers.inflight(b.peer_id) == 0)
            # and the peer is served again afterwards
            sessions = DhtSessions(b.host)
            assert isinstance(await find_node(sessions, a.peer_id, a.peer_id.to_bytes()), list)
            await sessions.close()

    trio.run(main)


def test_lookup_is_bounded_in_rounds_time_and_candidates():
    """Peers that always answer with new "closer" peers cannot keep a lookup going; peers
    that never answer cannot hold it past its deadline (mock clock: no real waiting)."""
    bounds = LookupBounds(max_rounds=4, timeout_s=5.0, max_candidates=50)
    fresh = (ID(b"sybil-%d" % i) for i in itertools.count())
    calls: list[ID] = []

    async def sybil(peer):
        calls.append(peer)
        return [next(fresh) for _ in range(100)]  # more than any reply may bring

    async def silent(peer):
        calls.append(peer)
        if peer.to_bytes().startswith(b"slow"):
            await trio.sleep_forever()
        return []

    async def main():
        key = b"target"
        start = [ID(b"seed-%d" % i) for i in range(5)]
        got = await run_lookup(key, start, sybil, count=20, alpha=3, bounds=bounds)
        assert len(calls) <= bounds.max_rounds * 3 and len(got) <= 20
        calls.clear()
        t0 = trio.current_time()
        start = [ID(b"slow-%d" % i) for i in range(3)] + [ID(b"fast-%d" % i) for i in range(3)]
        got = await run_lookup(key, start, silent, count=20, alpha=6, bounds=bounds)
        assert trio.current_time() - t0 <= bounds.timeout_s + 1e-6
        assert len(calls) == 6 and sorted(p.to_bytes() for p in got) == [
            b"fast-0", b"fast-1", b"fast-2"]

    trio.run(main, clock=MockClock(autojump_threshold=0))

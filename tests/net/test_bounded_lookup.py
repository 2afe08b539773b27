"""``dht_routing.closest_peers`` is bounded: peers that always answer with new "closer" peers
cannot keep a lookup going past its round bound, peers that never answer are dropped from the
routing table once their query times out, and what the lookup keeps per DHT (sessions, the
closest-peers cache) lives in the adapter's side table, not on py-libp2p's object.

The DHT here is a stand-in (routing table, peerstore, connected peers) and FIND_NODE is
replaced by the test's responder, so the lookup logic runs alone on trio's mock clock (no
real waiting, no timing asserts). The real-network path is covered by the registry and
DHT-guard tests.
"""

from __future__ import annotations

import itertools

import pytest
import trio
from libp2p.peer.id import ID
from trio.testing import MockClock

from volunteer.net import dht_routing
from volunteer.net import libp2p_adapter as lp
from volunteer.net.dht_rpc import MAX_CLOSER_PEERS, DhtSessions, LookupBounds

pytestmark = pytest.mark.timeout(60)


class FakeRoutingTable:
    """What ``closest_peers`` uses of py-libp2p's routing table, recording its calls."""

    def __init__(self, peers: list[ID]) -> None:
        self.peers = list(peers)
        self.added: list[ID] = []
        self.removed: list[ID] = []

    def find_local_closest_peers(self, key: bytes, count: int) -> list[ID]:
        return self.peers[:count]

    def remove_peer(self, peer: ID) -> None:
        self.removed.append(peer)

    async def add_peer(self, info) -> None:
        self.added.append(info.peer_id)


class FakeStore:
    def get_protocols(self, peer: ID) -> list[str]:
        return []

    def addrs(self, peer: ID) -> list:
        return []


class FakeHost:
    def get_peerstore(self) -> FakeStore:
        return FakeStore()

    def get_connected_peers(self) -> list[ID]:
        return []


class FakeDHT:
    def __init__(self, seeds: list[ID]) -> None:
        self.local_peer_id = ID(b"local")
        self.routing_table = FakeRoutingTable(seeds)
        self.host = FakeHost()


def test_sybil_answers_cannot_extend_the_lookup_past_its_rounds(monkeypatch):
    bounds = LookupBounds(max_rounds=5, timeout_s=1000.0, max_candidates=100)
    fresh = (ID(b"sybil-%d" % i) for i in itertools.count())
    asked: list[ID] = []

    async def sybil_find_node(sessions, peer, key):
        asked.append(peer)
        await trio.sleep(0.5)  # mock clock: no real waiting
        return [next(fresh) for _ in range(3 * MAX_CLOSER_PEERS)]  # always new, always more

    monkeypatch.setattr(dht_routing, "find_node", sybil_find_node)
    dht = FakeDHT([ID(b"seed-%d" % i) for i in range(4)])

    async def main():
        got = await dht_routing.closest_peers(dht, b"key", count=20, bounds=bounds)
        assert 0 < len(got) <= 20
        assert set(got) <= set(asked)
        # never more than ALPHA queries per round, never more rounds than the bound
        assert len(asked) <= bounds.max_rounds * dht_routing.ALPHA
        assert len(asked) > dht_routing.ALPHA  # it did go on past the first round
        assert len(dht.routing_table.added) == len(asked) == len(set(asked))
        assert set(dht.routing_table.added) == set(asked)
        assert dht.routing_table.removed == []
        assert dht.local_peer_id not in asked

    trio.run(main, clock=MockClock(autojump_threshold=0))


def test_silent_peers_time_out_and_leave_the_routing_table(monkeypatch):
    slow = [ID(b"slow-%d" % i) for i in range(3)]
    fast = [ID(b"fast-%d" % i) for i in range(2)]

    async def find_node(sessions, peer, key):
        if peer in slow:
            await trio.sleep_forever()
        if peer == fast[0]:
            raise ConnectionError("reset")
        return [dht.local_peer_id]  # ourselves: never a candidate

    monkeypatch.setattr(dht_routing, "find_node", find_node)
    dht = FakeDHT(slow + fast)

    async def main():
        t0 = trio.current_time()
        got = await dht_routing.closest_peers(dht, b"key", query_timeout=3.0)
        assert trio.current_time() - t0 <= 3.0 + 1e-6  # one round, each query bounded
        assert got == [fast[1]]
        assert sorted(dht.routing_table.removed, key=ID.to_bytes) == sorted([*slow, fast[0]],
                                                                      key=ID.to_bytes)
        assert dht.routing_table.added == [fast[1]]

    trio.run(main, clock=MockClock(autojump_threshold=0))


def test_sessions_and_cache_live_in_the_side_table(monkeypatch):
    peer = ID(b"peer-0")
    calls: list[ID] = []

    async def find_node(sessions, p, key):
        assert isinstance(sessions, DhtSessions)
        calls.append(p)
        return []

    monkeypatch.setattr(dht_routing, "find_node", find_node)
    dht = FakeDHT([peer])

    async def main():
        assert await dht_routing.cached_closest_peers(dht, b"k") == [peer]
        assert await dht_routing.cached_closest_peers(dht, b"k") == [peer]
        assert calls == [peer]  # the second one came from the cache
        dht_routing.forget_closest(dht, b"k")
        assert await dht_routing.cached_closest_peers(dht, b"k") == [peer]
        assert calls == [peer, peer]

    trio.run(main)
    assert dht_routing.sessions_of(dht) is lp.peek_side_state(dht, "sessions")
    assert set(vars(dht)) == {"local_peer_id", "routing_table", "host"}
    dht_routing.forget_closest(FakeDHT([]), b"k")  # nothing cached yet: no error


def test_a_failing_peer_leaves_the_cached_set_not_the_whole_set(monkeypatch):
    peers = [ID(b"peer-%d" % i) for i in range(dht_routing.MIN_CACHED + 1)]

    async def find_node(sessions, p, key):
        return []

    monkeypatch.setattr(dht_routing, "find_node", find_node)
    dht = FakeDHT(peers)
    stats = dht_routing.routing_stats(dht)

    async def main():
        first = await dht_routing.cached_closest_peers(dht, b"k")
        dht_routing.forget_closest(dht, b"k", first[0])  # one store timed out
        assert await dht_routing.cached_closest_peers(dht, b"k") == first[1:]
        assert stats["full"] == 1  # no new lookup for one failure
        dht_routing.forget_closest(dht, b"k", first[1])  # fewer than MIN_CACHED left
        assert by_id(await dht_routing.cached_closest_peers(dht, b"k")) == by_id(peers)
        assert stats["full"] == 2

    def by_id(xs):
        return sorted(xs, key=ID.to_bytes)

    trio.run(main)


class FakeTime:
    """Stands in for ``dht_routing.time``: the cache's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def _ranked(key: bytes, peers: list[ID], first: bool) -> ID:
    """A new peer id that sorts first (or last) among ``peers`` by distance to ``key``."""
    from libp2p.kad_dht.utils import sort_peer_ids_by_distance

    for i in itertools.count():
        cand = ID(b"new-%d" % i)
        order = sort_peer_ids_by_distance(key, [*peers, cand])
        if order[0 if first else -1] == cand:
            return cand
    raise AssertionError("unreachable")


def test_an_old_closest_set_is_checked_with_a_few_requests_not_looked_up_again(monkeypatch):
    peers = [ID(b"peer-%d" % i) for i in range(6)]
    clock = FakeTime()
    monkeypatch.setattr(dht_routing, "time", clock)
    calls: list[ID] = []
    answer: list[ID] = []
    silent: set[ID] = set()

    every_call: list[ID] = []

    async def find_node(sessions, p, key):
        calls.append(p)
        every_call.append(p)
        if p in silent:
            raise ConnectionError("reset")
        return list(answer)

    monkeypatch.setattr(dht_routing, "find_node", find_node)
    dht = FakeDHT(peers)
    stats = dht_routing.routing_stats(dht)

    def by_id(xs):
        return sorted(xs, key=ID.to_bytes)

    async def main():
        first = await dht_routing.cached_closest_peers(dht, b"k")
        assert by_id(first) == by_id(peers)
        assert len(calls) == len(peers) and stats["full"] == 1  # a full lookup asked everyone
        calls.clear()
        clock.now += dht_routing.CLOSEST_FRESH_S - 1
        assert await dht_routing.cached_closest_peers(dht, b"k") == first
        assert calls == [] and stats["fresh"] == 1  # fresh: used as is
        clock.now += 2
        assert await dht_routing.cached_closest_peers(dht, b"k") == first
        assert by_id(calls) == by_id(first[:dht_routing.CHECK_ASK])  # CHECK_ASK requests
        assert stats["checked"] == 1 and stats["full"] == 1
        calls.clear()
        assert await dht_routing.cached_closest_peers(dht, b"k") == first
        assert calls == []  # the check renewed it
        dht_routing.doubt_closest(dht, b"k")  # a read found nothing: check on next use
        newcomer = _ranked(b"k", first, first=True)
        answer[:] = [newcomer, dht.local_peer_id]
        got = await dht_routing.cached_closest_peers(dht, b"k")
        assert got == [newcomer, *first][:len(first)]  # named near the key: merged in, first
        assert len(calls) == dht_routing.CHECK_ASK and stats["full"] == 1
        calls.clear()
        answer[:] = []
        clock.now += dht_routing.CLOSEST_FRESH_S + 1
        silent.add(got[1])  # a checked peer fails: full lookup (without it)
        again = await dht_routing.cached_closest_peers(dht, b"k")
        assert got[1] not in again and stats["full"] == 2
        calls.clear()
        clock.now += dht_routing.CLOSEST_TTL + 1
        await dht_routing.cached_closest_peers(dht, b"k")
        assert stats["full"] == 3  # too old to check: full lookup
        assert stats["find_node"] == len(every_call)  # each request sent is counted

    trio.run(main)

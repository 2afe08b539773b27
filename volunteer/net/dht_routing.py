"""Kademlia routing for the registry: bounded FIND_NODE lookups over live DHT servers.

py-libp2p 0.8.1's ``find_closest_peers_network`` falls back to *every* connected or known
peer (trainers in DHT client mode, peers long gone), swallows failures (a dead peer looks
like a live one that knows nobody) and can wait up to 30 s. ``closest_peers`` here starts
from peers known to speak KAD, bounds each query, returns only peers that answered and
drops the others from the routing table; the lookup itself is ``dht_rpc.run_lookup``,
bounded in rounds, time and candidates (``LookupBounds``), so peers that keep answering
with ever "closer" new peers cannot keep it going. Its body is ``table_lookup`` (routing
table + any FIND_NODE function): the swarm simulator (``volunteer.sim``) runs that same code
over a simulated transport.

``cached_closest_peers`` keeps each key's result, because the closest set of a key rarely
changes and a full lookup asks about ``MAX_QUERY_PEERS`` peers: done for every key a node
announces (every ttl/3 then) and reads (replica rounds, shard decisions), full lookups were most
of a swarm's idle CPU (profiled: 24 daemons on 2 cores used 1.9 cores, DHT lookups and their
streams on top). A result younger than ``CLOSEST_FRESH_S`` is used as is; an older one (up to
``CLOSEST_TTL``) is *checked* with one FIND_NODE to each of its ``CHECK_ASK`` closest peers,
which know the key's neighbourhood best: the peers they name are merged in by distance (a
newcomer near the key joins the set), ``CHECK_ASK`` requests instead of a lookup; only when
one of them fails to answer does a full lookup run. A peer that fails a store or get leaves
the key's cached set (``forget_closest``; the whole set goes once fewer than ``MIN_CACHED``
are left), and a read that found nothing marks the set for a check on its next use
(``doubt_closest``).

Requests go through ``dht_rpc.DhtSessions`` (reused, bounded streams). Everything this
module keeps on a py-libp2p ``KadDHT`` (its routing table, our sessions and cache) is reached
through ``libp2p_adapter`` (``lp``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from volunteer.net import libp2p_adapter as lp
from volunteer.net.dht_rpc import (
    DEFAULT_LOOKUP_BOUNDS,
    DhtSessions,
    LookupBounds,
    find_node,
    run_lookup,
)

log = logging.getLogger(__name__)

QUERY_TIMEOUT = 3.0
ALPHA = 10
MAX_QUERY_PEERS = 20
# A cached closest set younger than this is used unchecked. Just under two heartbeats (30 s):
# announces check each key's set every other heartbeat. At 30 s every heartbeat checked, and
# the checks' FIND_NODE replies (20 signed peer records each) were most of a volunteer's DHT
# bytes (scripts/simulate_swarm.py, 10,000 volunteers: 359 -> 249 KB and 110 -> 89 requests
# per volunteer per minute; 1,000: 294 -> 194 KB).
CLOSEST_FRESH_S = 55.0
CLOSEST_TTL = 600.0  # older than this, a full lookup; in between, a check (CHECK_ASK requests)
CHECK_ASK = 3
MIN_CACHED = 3  # fewer live-looking peers than this left in a cached set: look up again
MAX_CACHED_KEYS = 4096


async def closest_peers(dht: KadDHT, key_bytes: bytes, count: int = MAX_QUERY_PEERS,
                        query_timeout: float = QUERY_TIMEOUT,
                        bounds: LookupBounds = DEFAULT_LOOKUP_BOUNDS) -> list[ID]:
    """Iterative Kademlia lookup of the ``count`` closest *live* DHT servers to a key.

    Unlike py-libp2p's ``find_closest_peers_network`` it starts only from peers known to
    speak KAD (routing table, then connected KAD peers), bounds every query
    (``query_timeout``) and the whole lookup (``bounds``: rounds, seconds, candidates),
    returns only peers that answered, and drops peers that did not from the routing table,
    so dead peers and trainers (DHT clients) never slow announces and lookups down.
    """
    store = dht.host.get_peerstore()

    def connected_kad_peers() -> list[ID]:
        out: list[ID] = []
        for p in dht.host.get_connected_peers():
            try:
                if str(KAD_PROTOCOL_ID) in (store.get_protocols(p) or []):
                    out.append(p)
            except Exception:
                continue
        return out

    async def find(peer: ID) -> list[ID]:
        return await find_node(sessions_of(dht), peer, key_bytes)

    return await table_lookup(lp.routing_table(dht), dht.local_peer_id, key_bytes, find,
                              count=count, query_timeout=query_timeout, bounds=bounds,
                              fallback=connected_kad_peers, addrs_of=store.addrs,
                              stats=routing_stats(dht))


async def table_lookup(rt: Any, local: ID, key_bytes: bytes,
                       find: Callable[[ID], Awaitable[list[ID]]], *,
                       count: int = MAX_QUERY_PEERS, query_timeout: float = QUERY_TIMEOUT,
                       bounds: LookupBounds = DEFAULT_LOOKUP_BOUNDS,
                       fallback: Callable[[], Iterable[ID]] = tuple,
                       addrs_of: Callable[[ID], Any] = lambda _p: [],
                       stats: Counter | None = None) -> list[ID]:
    """The body of ``closest_peers`` over any transport (the seam the swarm simulator uses).

    ``rt`` is a py-libp2p ``RoutingTable`` (the start set: its ``count`` closest, then
    ``fallback()`` when it holds fewer), ``find(peer)`` one FIND_NODE (raises when the peer
    does not answer properly). Each query is bounded by ``query_timeout``; a peer that did
    not answer leaves ``rt``, one that did is added to it (``addrs_of(peer)`` its addresses).
    """
    candidates: set[ID] = set(rt.find_local_closest_peers(key_bytes, count))
    if len(candidates) < count:
        candidates.update(fallback())
    stats = stats if stats is not None else Counter()

    async def query(peer: ID) -> list[ID] | None:
        stats["find_node"] += 1
        got = None
        with trio.move_on_after(query_timeout):
            try:
                got = await find(peer)
            except Exception as e:
                log.debug("FIND_NODE to %s failed: %r", peer, e)
        if got is None:
            rt.remove_peer(peer)
            return None
        try:
            await rt.add_peer(PeerInfo(peer, addrs_of(peer)))
        except Exception:
            pass
        return got

    return await run_lookup(key_bytes, candidates, query, count=count, alpha=ALPHA,
                            exclude=local, bounds=bounds)


def sessions_of(dht: KadDHT) -> DhtSessions:
    """The DHT's stream sessions (``RegistryDHT`` owns one; other KadDHTs get one here,
    kept in the adapter's side table rather than on py-libp2p's object)."""
    from volunteer.net.dht_store import RegistryDHT  # dht_store imports this module

    if isinstance(dht, RegistryDHT):
        return dht.sessions
    return lp.side_state(dht, "sessions", lambda: DhtSessions(dht.host))


def routing_stats(dht: KadDHT) -> Counter:
    """How this node found closest peers: ``fresh`` (cache), ``checked`` (cache confirmed by
    ``CHECK_ASK`` requests), ``full`` (iterative lookups), ``find_node`` (requests sent by
    both). ``volunteer status`` shows them (``network.dht_routing``)."""
    return lp.side_state(dht, "routing_stats", Counter)


async def cached_closest_peers(dht: KadDHT, key_bytes: bytes) -> list[ID]:
    """The key's closest live peers from the cache, checked or looked up again when old
    (see the module docstring)."""
    cache: dict[bytes, tuple[float, list[ID]]] = lp.side_state(dht, "closest", dict)
    stats = routing_stats(dht)
    hit = cache.get(key_bytes)
    now = time.monotonic()
    if hit is not None and hit[1] and now - hit[0] < CLOSEST_TTL:
        if now - hit[0] < CLOSEST_FRESH_S:
            stats["fresh"] += 1
            return hit[1]
        checked = await _check(dht, key_bytes, hit[1])
        if checked is not None:
            stats["checked"] += 1
            cache[key_bytes] = (time.monotonic(), checked)
            return checked
    stats["full"] += 1
    peers = await closest_peers(dht, key_bytes)
    if len(cache) >= MAX_CACHED_KEYS:
        cache.clear()
    cache[key_bytes] = (time.monotonic(), peers)
    return peers


async def _check(dht: KadDHT, key_bytes: bytes, cached: list[ID]) -> list[ID] | None:
    """Ask the ``CHECK_ASK`` closest of ``cached`` for their closest peers to the key: None
    when one of them does not answer (a full lookup follows), else ``cached`` with the peers
    they named merged in by distance (a newcomer near the key; one that turns out dead fails
    its store or get, which drops it from the set)."""
    asked = cached[:CHECK_ASK]
    named: set[ID] = set()
    answered = 0
    stats = routing_stats(dht)

    async def ask(peer: ID) -> None:
        nonlocal answered
        stats["find_node"] += 1
        with trio.move_on_after(QUERY_TIMEOUT):
            try:
                named.update(await find_node(sessions_of(dht), peer, key_bytes))
                answered += 1
            except Exception as e:
                log.debug("FIND_NODE check to %s failed: %r", peer, e)

    async with trio.open_nursery() as nursery:
        for peer in asked:
            nursery.start_soon(ask, peer)
    if answered < len(asked):
        return None
    named.discard(dht.local_peer_id)
    return sort_peer_ids_by_distance(key_bytes, list(set(cached) | named))[:max(len(cached), 1)]


def forget_closest(dht: KadDHT, key_bytes: bytes, peer: ID | None = None) -> None:
    """``peer`` failed a store or get for the key: drop it from the key's cached closest
    peers, and the whole set once fewer than ``MIN_CACHED`` are left (or when no peer is
    named). Dropping only the one peer matters under load: forgetting the set at every
    timeout made every announce a full lookup, which made more timeouts (measured: 24
    daemons on 2 cores, every announce a full lookup, most entries never stored)."""
    cache = lp.peek_side_state(dht, "closest")
    if cache is None:
        return
    hit = cache.get(key_bytes)
    if hit is None:
        return
    left = [p for p in hit[1] if p != peer] if peer is not None else []
    if len(left) < MIN_CACHED:
        cache.pop(key_bytes, None)
    else:
        cache[key_bytes] = (hit[0], left)


def doubt_closest(dht: KadDHT, key_bytes: bytes) -> None:
    """Have the key's cached closest peers checked on their next use (a read found nothing
    there: they may not be the closest any more)."""
    cache = lp.peek_side_state(dht, "closest")
    hit = cache.get(key_bytes) if cache is not None else None
    if hit is not None:
        cache[key_bytes] = (min(hit[0], time.monotonic() - CLOSEST_FRESH_S), hit[1])

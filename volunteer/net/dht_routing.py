"""Kademlia routing for the registry: bounded FIND_NODE lookups over live DHT servers.

py-libp2p 0.8.1's ``find_closest_peers_network`` falls back to *every* connected or known
peer (trainers in DHT client mode, peers long gone), swallows failures (a dead peer looks
like a live one that knows nobody) and can wait up to 30 s. ``closest_peers`` here starts
from peers known to speak KAD, bounds each query, returns only peers that answered and
drops the others from the routing table; the lookup itself is ``dht_rpc.run_lookup``,
bounded in rounds, time and candidates (``LookupBounds``), so peers that keep answering
with ever "closer" new peers cannot keep it going.

``cached_closest_peers`` keeps each key's result, because the closest set of a key rarely
changes and a full lookup asks about ``MAX_QUERY_PEERS`` peers: done for every key a node
announces (every ttl/3) and reads (replica rounds, shard decisions), full lookups were most
of a swarm's idle CPU (profiled: 24 daemons on 2 cores used 1.9 cores, DHT lookups and their
streams on top). A result younger than ``CLOSEST_FRESH_S`` is used as is; an older one (up to
``CLOSEST_TTL``) is *checked* with one FIND_NODE to each of its ``CHECK_ASK`` closest peers,
which know the key's neighbourhood best: when they name no live-looking peer closer than the
cached ones the result stands (``CHECK_ASK`` requests instead of a lookup), else a full lookup
runs. A failed store or get forgets the key's result (``forget_closest``), a read that found
nothing marks it for a check on the next use (``doubt_closest``).

Requests go through ``dht_rpc.DhtSessions`` (reused, bounded streams). Everything this
module keeps on a py-libp2p ``KadDHT`` (its routing table, our sessions and cache) is reached
through ``libp2p_adapter`` (``lp``).
"""

from __future__ import annotations

import logging
import time

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
CLOSEST_FRESH_S = 30.0  # a cached closest set younger than this is used unchecked
CLOSEST_TTL = 600.0  # older than this, a full lookup; in between, a check (CHECK_ASK requests)
CHECK_ASK = 3
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
    local = dht.local_peer_id
    rt = lp.routing_table(dht)
    candidates: set[ID] = set(rt.find_local_closest_peers(key_bytes, count))
    if len(candidates) < count:
        store = dht.host.get_peerstore()
        for p in dht.host.get_connected_peers():
            try:
                if str(KAD_PROTOCOL_ID) in (store.get_protocols(p) or []):
                    candidates.add(p)
            except Exception:
                continue

    async def query(peer: ID) -> list[ID] | None:
        got = None
        with trio.move_on_after(query_timeout):
            try:
                got = await find_node(sessions_of(dht), peer, key_bytes)
            except Exception as e:
                log.debug("FIND_NODE to %s failed: %r", peer, e)
        if got is None:
            rt.remove_peer(peer)
            return None
        try:
            await rt.add_peer(PeerInfo(peer, dht.host.get_peerstore().addrs(peer)))
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


async def cached_closest_peers(dht: KadDHT, key_bytes: bytes) -> list[ID]:
    """The key's closest live peers from the cache, checked or looked up again when old
    (see the module docstring)."""
    cache: dict[bytes, tuple[float, list[ID]]] = lp.side_state(dht, "closest", dict)
    hit = cache.get(key_bytes)
    now = time.monotonic()
    if hit is not None and hit[1] and now - hit[0] < CLOSEST_TTL:
        if now - hit[0] < CLOSEST_FRESH_S:
            return hit[1]
        if await _still_closest(dht, key_bytes, hit[1]):
            cache[key_bytes] = (time.monotonic(), hit[1])
            return hit[1]
    peers = await closest_peers(dht, key_bytes)
    if len(cache) >= MAX_CACHED_KEYS:
        cache.clear()
    cache[key_bytes] = (time.monotonic(), peers)
    return peers


async def _still_closest(dht: KadDHT, key_bytes: bytes, cached: list[ID]) -> bool:
    """Whether the ``CHECK_ASK`` closest of ``cached`` still answer and name no peer closer
    to the key than the farthest cached one (a peer that joined near the key)."""
    asked = cached[:CHECK_ASK]
    known = set(cached) | {dht.local_peer_id}
    named: list[ID] = []
    answered = 0

    async def ask(peer: ID) -> None:
        nonlocal answered
        with trio.move_on_after(QUERY_TIMEOUT):
            try:
                named.extend(await find_node(sessions_of(dht), peer, key_bytes))
                answered += 1
            except Exception as e:
                log.debug("FIND_NODE check to %s failed: %r", peer, e)

    async with trio.open_nursery() as nursery:
        for peer in asked:
            nursery.start_soon(ask, peer)
    if answered < len(asked):
        return False
    newcomers = [p for p in named if p not in known]
    if not newcomers:
        return True
    ranked = sort_peer_ids_by_distance(key_bytes, [*cached, *newcomers])
    return set(ranked[:len(cached)]) == set(cached)


def forget_closest(dht: KadDHT, key_bytes: bytes) -> None:
    """Drop a key's cached closest peers (one of them failed us)."""
    cache = lp.peek_side_state(dht, "closest")
    if cache is not None:
        cache.pop(key_bytes, None)


def doubt_closest(dht: KadDHT, key_bytes: bytes) -> None:
    """Have the key's cached closest peers checked on their next use (a read found nothing
    there: they may not be the closest any more)."""
    cache = lp.peek_side_state(dht, "closest")
    hit = cache.get(key_bytes) if cache is not None else None
    if hit is not None:
        cache[key_bytes] = (min(hit[0], time.monotonic() - CLOSEST_FRESH_S), hit[1])

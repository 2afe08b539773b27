"""Kademlia routing for the registry: bounded FIND_NODE lookups over live DHT servers.

py-libp2p 0.8.1's ``find_closest_peers_network`` falls back to *every* connected or known
peer (trainers in DHT client mode, peers long gone), swallows failures (a dead peer looks
like a live one that knows nobody) and can wait up to 30 s. ``closest_peers`` here starts
from peers known to speak KAD, bounds each query, returns only peers that answered and
drops the others from the routing table. ``cached_closest_peers`` keeps each key's result
for ``CLOSEST_TTL`` seconds (the closest set of a key rarely changes), so a lookup or an
announce of a key seen recently costs one round trip; a failed store or get forgets it.

Requests go through ``dht_rpc.DhtSessions`` (reused, bounded streams).
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

from volunteer.net.dht_rpc import DhtSessions, find_node

log = logging.getLogger(__name__)

QUERY_TIMEOUT = 3.0
ALPHA = 10
MAX_QUERY_PEERS = 20
CLOSEST_TTL = 30.0


async def closest_peers(dht: KadDHT, key_bytes: bytes, count: int = MAX_QUERY_PEERS,
                        query_timeout: float = QUERY_TIMEOUT) -> list[ID]:
    """Iterative Kademlia lookup of the ``count`` closest *live* DHT servers to a key.

    Unlike py-libp2p's ``find_closest_peers_network`` it starts only from peers known to
    speak KAD (routing table, then connected KAD peers), bounds every query, returns only
    peers that answered, and drops peers that did not from the routing table, so dead
    peers and trainers (DHT clients) never slow announces and lookups down.
    """
    local = dht.local_peer_id
    rt = dht.routing_table
    candidates: set[ID] = set(rt.find_local_closest_peers(key_bytes, count))
    if len(candidates) < count:
        store = dht.host.get_peerstore()
        for p in dht.host.get_connected_peers():
            try:
                if str(KAD_PROTOCOL_ID) in (store.get_protocols(p) or []):
                    candidates.add(p)
            except Exception:
                continue
    candidates.discard(local)
    queried: set[ID] = set()
    answered: set[ID] = set()

    async def query(peer: ID) -> None:
        got = None
        with trio.move_on_after(query_timeout):
            try:
                got = await find_node(sessions_of(dht), peer, key_bytes)
            except Exception as e:
                log.debug("FIND_NODE to %s failed: %r", peer, e)
        if got is None:
            rt.remove_peer(peer)
            return
        answered.add(peer)
        try:
            await rt.add_peer(PeerInfo(peer, dht.host.get_peerstore().addrs(peer)))
        except Exception:
            pass
        candidates.update(p for p in got if p != local)

    while True:
        best = sort_peer_ids_by_distance(key_bytes, list(candidates - (queried - answered)))
        todo = [p for p in best[:count] if p not in queried][:ALPHA]
        if not todo:
            break
        queried.update(todo)
        async with trio.open_nursery() as nursery:
            for peer in todo:
                nursery.start_soon(query, peer)
    return sort_peer_ids_by_distance(key_bytes, list(answered))[:count]


def sessions_of(dht: KadDHT) -> DhtSessions:
    """The DHT's stream sessions (``RegistryDHT`` owns one; other KadDHTs get one here)."""
    sessions = getattr(dht, "sessions", None)
    if sessions is None:
        sessions = dht.sessions = DhtSessions(dht.host)  # type: ignore[attr-defined]
    return sessions


async def cached_closest_peers(dht: KadDHT, key_bytes: bytes) -> list[ID]:
    """``closest_peers`` cached for ``CLOSEST_TTL`` seconds per key."""
    cache = dht.__dict__.setdefault("_volunteer_closest", {})
    hit = cache.get(key_bytes)
    now = time.monotonic()
    if hit is not None and now - hit[0] < CLOSEST_TTL and hit[1]:
        return hit[1]
    peers = await closest_peers(dht, key_bytes)
    if len(cache) > 4096:
        cache.clear()
    cache[key_bytes] = (time.monotonic(), peers)
    return peers


def forget_closest(dht: KadDHT, key_bytes: bytes) -> None:
    """Drop a key's cached closest peers (one of them failed us)."""
    dht.__dict__.get("_volunteer_closest", {}).pop(key_bytes, None)

"""Kademlia routing for the registry: bounded FIND_NODE lookups over live DHT servers.

py-libp2p 0.8.1's ``find_closest_peers_network`` falls back to *every* connected or known
peer (trainers in DHT client mode, peers long gone), swallows failures (a dead peer looks
like a live one that knows nobody) and can wait up to 30 s. ``closest_peers`` here starts
from peers known to speak KAD, bounds each query, returns only peers that answered and
drops the others from the routing table; the lookup itself is ``dht_rpc.run_lookup``,
bounded in rounds, time and candidates (``LookupBounds``), so peers that keep answering
with ever "closer" new peers cannot keep it going. ``cached_closest_peers`` keeps each key's result
for ``CLOSEST_TTL`` seconds (the closest set of a key rarely changes), so a lookup or an
announce of a key seen recently costs one round trip; a failed store or get forgets it.

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
CLOSEST_TTL = 30.0


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
    """``closest_peers`` cached for ``CLOSEST_TTL`` seconds per key."""
    cache: dict[bytes, tuple[float, list[ID]]] = lp.side_state(dht, "closest", dict)
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
    cache = lp.peek_side_state(dht, "closest")
    if cache is not None:
        cache.pop(key_bytes, None)

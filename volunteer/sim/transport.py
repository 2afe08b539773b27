"""The simulated transport: peers, links (RTT, loss, NAT), and FIND_NODE over them.

``SimNetwork`` holds every simulated peer (``SimPeer``) and answers the one DHT request a
lookup makes, FIND_NODE, the way a py-libp2p 0.8.1 ``KadDHT`` server does (its
``_do_handle_stream``): the asking peer, when it is a DHT server, is added to the answering
peer's routing table, and the answer is the ``BUCKET_SIZE`` closest peers of the answering
peer's *own* routing table, without the asking peer. Routing tables are py-libp2p's real
``RoutingTable`` (k-buckets, splits); the lookup is the product's own code,
``volunteer.net.dht_routing.table_lookup`` (start from the table, bound every query by
``QUERY_TIMEOUT``, drop peers that do not answer from the table, add those that do) around
``volunteer.net.dht_rpc.run_lookup``. Only the wire is simulated: ``find_node`` sleeps the
link's cost in virtual time (``clock.run_virtual``) and returns the answer, or never
returns (lost request, dead or unreachable peer) so that the caller's timeout ends it, as
a real request to a vanished peer does.

Peer ids: real ``libp2p.peer.id.ID`` objects whose bytes have the shape of an Ed25519
identity multihash (``00 24 08 01 12 20`` + 32 random bytes) without a key behind them:
generating 10,000 key pairs is slow, and DHT code uses ids only for XOR distance
(sha256 of the id bytes, ``libp2p.kad_dht.utils``), equality and hashing.

Routing tables need a host only for its peerstore (addresses, protocols for the server-mode
check) and, once 256 buckets are full, a libp2p ping; ``_TableHost`` answers the first two
with "nothing known" (the check then passes, as it does for a peer whose identify has not
run) and the simulator never gets near 256 buckets.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
from dataclasses import dataclass, field

import trio
from libp2p.kad_dht.common import BUCKET_SIZE
from libp2p.kad_dht.routing_table import RoutingTable
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from volunteer.net.dht_routing import MAX_QUERY_PEERS, QUERY_TIMEOUT, table_lookup
from volunteer.net.dht_rpc import DEFAULT_LOOKUP_BOUNDS, LookupBounds
from volunteer.sim.clock import normal, now, unit

_ED25519_IDENTITY_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
_Z99 = 2.3263478740408408  # standard normal quantile of 0.99


@dataclass(frozen=True)
class LinkModel:
    """What links between volunteers cost and how they fail (the simulator's assumptions).

    RTT: lognormal per pair of peers, median ``rtt_median_s`` and 99th percentile
    ``rtt_p99_s`` (60 ms / 300 ms: a mix of same-continent paths, ~20-80 ms, and
    intercontinental ones, 150-300 ms, as public RIPE Atlas / WonderNetwork ping tables
    show; an assumption, not a measurement here). A query to a peer not yet connected first
    pays the connection: ``connect_rtts`` round trips (TCP 1, Noise XX 1.5, multistream 0.5)
    plus ``connect_extra_s`` (py-libp2p's happy-eyeballs delay, >= 250 ms measured here);
    connections are kept. Every request opens a stream (``stream_rtts``: multistream-select
    of the KAD protocol; ``DhtSessions`` reuses a stream only within ~1 s) and pays one RTT.
    ``query_loss``: chance that a request gets no answer (peer overloaded, connection reset);
    the caller then waits its timeout. NAT: ``nat_fraction`` of volunteers are behind NAT
    (about 91% of IPFS peers are), a NATed peer is reachable by hole punching with chance
    ``punch_success`` (about 70% in the wild) and otherwise stays relayed; a relayed path
    costs a second (drawn) RTT through the relay. Only public peers are DHT servers (the
    daemon serves the DHT only when its dial-back says it is reachable), so DHT requests
    always go to a public peer: NAT shapes the DHT through *who can be a server*, never
    through relayed DHT paths.
    """

    rtt_median_s: float = 0.060
    rtt_p99_s: float = 0.300
    connect_rtts: float = 3.0
    connect_extra_s: float = 0.25
    stream_rtts: float = 1.0
    query_loss: float = 0.01
    nat_fraction: float = 0.91
    punch_success: float = 0.70

    @property
    def rtt_sigma(self) -> float:
        """The lognormal's sigma from the median and the 99th percentile."""
        return math.log(self.rtt_p99_s / self.rtt_median_s) / _Z99


class _NoPeerstore:
    def addrs(self, _peer: ID) -> list:
        return []

    def get_protocols(self, _peer: ID) -> list:
        return []


class _TableHost:
    """The minimal host a py-libp2p ``RoutingTable`` needs (see module docstring)."""

    _store = _NoPeerstore()

    def get_peerstore(self) -> _NoPeerstore:
        return self._store


@dataclass
class SimPeer:
    """One simulated volunteer: id, NAT type, whether it serves the DHT, its routing table."""

    index: int
    peer_id: ID
    public: bool
    relayed: bool
    rt: RoutingTable
    server: bool = False  # serving the DHT (a public peer, once it has joined)
    alive: bool = True
    joined_at: float = 0.0


@dataclass
class LookupTrace:
    """One lookup as the simulator saw it: result, rounds (hops), virtual seconds, requests."""

    peers: list[ID]
    rounds: int
    seconds: float
    queries: int
    timeouts: int


@dataclass
class NetStats:
    """Requests sent and answered, and connections opened, over the whole run."""

    find_node: int = 0
    answered: int = 0
    connections: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class SimNetwork:
    """Simulated peers and the FIND_NODE requests between them (see module docstring)."""

    def __init__(self, seed: int, links: LinkModel | None = None) -> None:
        self.seed = seed
        self.links = links or LinkModel()
        self.rng = random.Random(seed)
        self.peers: dict[ID, SimPeer] = {}
        self.by_index: list[SimPeer] = []
        self.stats = NetStats()
        self._host = _TableHost()
        self._conns: dict[int, set[int]] = {}
        self._hash: dict[ID, int] = {}
        self._serial = 0

    # -- membership ---------------------------------------------------------------------------
    def next_serial(self) -> int:
        """A fresh lookup serial (names the lookup in the loss draws)."""
        self._serial += 1
        return self._serial

    def new_peer(self, *, public: bool | None = None, peer_id: ID | None = None) -> SimPeer:
        """Create a peer (NAT type drawn from the link model unless ``public`` is given)."""
        index = len(self.by_index)
        if peer_id is None:
            peer_id = ID(_ED25519_IDENTITY_PREFIX + self.rng.randbytes(32))
        if public is None:
            public = self.rng.random() >= self.links.nat_fraction
        relayed = not public and unit(self.seed, "punch", index) > self.links.punch_success
        peer = SimPeer(index, peer_id, public, relayed, RoutingTable(peer_id, self._host),
                       joined_at=now() if _in_trio() else 0.0)
        self.peers[peer_id] = peer
        self.by_index.append(peer)
        return peer

    def kill(self, peer: SimPeer) -> None:
        """The peer vanishes without a goodbye: others keep it in their tables and time out."""
        peer.alive = False
        self._conns.pop(peer.index, None)

    def live(self) -> list[SimPeer]:
        return [p for p in self.by_index if p.alive]

    def live_servers(self) -> list[SimPeer]:
        return [p for p in self.by_index if p.alive and p.server]

    # -- distances ----------------------------------------------------------------------------
    def id_hash(self, peer: ID) -> int:
        """sha256 of the id bytes as an integer (what ``sort_peer_ids_by_distance`` uses)."""
        h = self._hash.get(peer)
        if h is None:
            h = self._hash[peer] = int.from_bytes(hashlib.sha256(peer.to_bytes()).digest(), "big")
        return h

    def closest(self, key: bytes, ids: list[ID], count: int) -> list[ID]:
        """The ``count`` of ``ids`` closest to ``key``, in the order
        ``RoutingTable.find_local_closest_peers`` and ``sort_peer_ids_by_distance`` give
        (same distance, cached hashes: a 10,000-peer run sorts tables millions of times)."""
        target = int.from_bytes(hashlib.sha256(key).digest(), "big")
        return heapq.nsmallest(count, ids, key=lambda p: self.id_hash(p) ^ target)

    def true_closest(self, key: bytes, count: int) -> list[ID]:
        """The ``count`` live DHT servers closest to ``key`` (the ideal lookup result)."""
        return self.closest(key, [p.peer_id for p in self.live_servers()], count)

    # -- links ----------------------------------------------------------------------------------
    def rtt(self, a: int, b: int) -> float:
        """The RTT between two peers (a fixed lognormal draw per pair; relayed paths add
        the relay's leg when neither end is public and one of them stays relayed)."""
        lo, hi = min(a, b), max(a, b)
        m = self.links
        rtt = m.rtt_median_s * math.exp(m.rtt_sigma * normal(self.seed, "rtt", lo, hi))
        pa, pb = self.by_index[a], self.by_index[b]
        if not pa.public and not pb.public and (pa.relayed or pb.relayed):
            rtt += m.rtt_median_s * math.exp(m.rtt_sigma * normal(self.seed, "relay", lo, hi))
        return rtt

    def connected_servers(self, peer: SimPeer) -> list[ID]:
        """DHT servers this one holds a connection to: the lookup's fallback start set
        (``closest_peers`` adds connected peers whose identify lists the KAD protocol)."""
        return [self.by_index[i].peer_id for i in sorted(self._conns.get(peer.index, ()))
                if self.by_index[i].server]

    async def find_node(self, src: SimPeer, dst_id: ID, key: bytes, serial: object) -> list[ID]:
        """FIND_NODE from ``src`` to ``dst_id`` (see module docstring); never returns when
        the request is lost or the peer is gone or not a DHT server."""
        self.stats.find_node += 1
        dst = self.peers.get(dst_id)
        if dst is None or not dst.alive or not dst.server:
            await trio.sleep_forever()
        assert dst is not None
        m = self.links
        rtt = self.rtt(src.index, dst.index)
        cost = rtt * (1.0 + m.stream_rtts)
        fresh = dst.index not in self._conns.get(src.index, ())
        if fresh:
            cost += rtt * m.connect_rtts + m.connect_extra_s
        if unit(self.seed, "loss", serial, src.index, dst.index) < m.query_loss:
            await trio.sleep_forever()
        await trio.sleep(cost)
        if not dst.alive or not src.alive:
            await trio.sleep_forever()
        if fresh:
            self.stats.connections += 1
            self._conns.setdefault(src.index, set()).add(dst.index)
            self._conns.setdefault(dst.index, set()).add(src.index)
        if src.server:  # an inbound KAD stream from a server: it joins the answerer's table
            await dst.rt.add_peer(PeerInfo(src.peer_id, []))
        self.stats.answered += 1
        answer = self.closest(key, dst.rt.get_peer_ids(), BUCKET_SIZE)
        return [p for p in answer if p != src.peer_id]

    async def lookup(self, src: SimPeer, key: bytes, *, serial: object,
                     count: int = MAX_QUERY_PEERS,
                     bounds: LookupBounds = DEFAULT_LOOKUP_BOUNDS) -> LookupTrace:
        """The product's lookup (``table_lookup``) from ``src`` for ``key`` over this network.

        ``serial`` names the lookup in the loss draws (the same seed and serial give the same
        losses whatever order tasks ran in): an int from ``next_serial`` for lookups made one
        after another, a name of what the lookup is (e.g. ``("join", index, 0)``) for
        concurrent ones. Rounds are counted as the distinct virtual times
        at which requests started (``run_lookup`` starts a round's requests together).
        """
        starts: list[float] = []
        answered = 0

        async def find(peer: ID) -> list[ID]:
            nonlocal answered
            starts.append(now())
            got = await self.find_node(src, peer, key, serial)
            answered += 1
            return got

        t0 = now()
        peers = await table_lookup(src.rt, src.peer_id, key, find, count=count,
                                   query_timeout=QUERY_TIMEOUT, bounds=bounds,
                                   fallback=lambda: self.connected_servers(src))
        return LookupTrace(peers, len(set(starts)), now() - t0, len(starts), len(starts) - answered)


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True

"""The DHT level of the swarm simulator: build a swarm of N volunteers, measure lookups.

``measure_dht(SwarmSpec(peers=N, ...), seed)`` runs under a virtual clock
(``clock.run_virtual``) and returns one row of figures:

1. **Build.** Peers join one after another (``join_gap_s`` apart). The first ``bootstrap``
   peers are public nodes that every manifest lists (they never leave). A joining peer does
   what ``SwarmNode.bootstrap_once`` does: it adds the bootstrap peers to its routing table
   and looks itself up (``table_lookup`` for its own id). A public peer then switches to
   DHT server mode and looks itself up again (``SwarmNode.set_dht_server``): that second
   lookup is what makes servers near it add it to their tables. NATed peers stay DHT clients.
2. **Lookups, no churn.** ``lookups`` times: a random volunteer publishes a record (its lookup
   of a registry-shaped key, then the record is held by the ``REPLICATION`` first peers it
   found, as ``publish_value`` stores it), another random volunteer reads it (its lookup; it
   asks its ``REPLICATION`` first peers, as ``lookup_value`` does). Success: one of those
   holds the record. Recall: the share of the key's true ``MAX_QUERY_PEERS`` closest live
   servers that the read lookup returned. Hops: rounds of requests (``run_lookup`` sends a
   round's requests together); latency: virtual seconds of the read lookup (cold: it pays
   the connections it opens), and of the same lookup repeated at once (``_warm``: its
   connections are open).
3. **Churn.** For ``churn_hours`` of virtual time, ``ChurnModel`` replaces peers (killed without
   a goodbye, a newcomer joins as in 1), publishes happen at random instants and each is read
   one heartbeat later (the oldest a holder set gets: publishers re-announce every heartbeat).
   Holders that left meanwhile do not count. Also measured: how often the publisher's
   ``CHECK_ASK`` first peers are all still there one heartbeat later (``cached_closest_peers``
   checks them; a failed check costs a full lookup), which feeds ``upkeep.upkeep_per_minute``.

Everything random comes from ``seed`` (driver choices from one ``random.Random``, in-task
draws from ``clock.unit``) and the driver acts on one event at a time, so a seed gives the
same figures on every run.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field

import trio
from libp2p.peer.peerinfo import PeerInfo

from volunteer.net import dht_routing, dht_store, records
from volunteer.sim.churn import ChurnModel
from volunteer.sim.clock import now, run_virtual, unit
from volunteer.sim.transport import LinkModel, LookupTrace, SimNetwork, SimPeer
from volunteer.sim.upkeep import constants, example_keys, upkeep_per_minute
from volunteer.sim.wire_sizes import message_bytes


@dataclass(frozen=True)
class SwarmSpec:
    """One simulated swarm and what to measure in it (see module docstring)."""

    peers: int
    lookups: int = 100
    churn_lookups: int = 100
    bootstrap: int = 4
    join_gap_s: float = 1.0
    churn: ChurnModel = field(default_factory=ChurnModel)
    churn_hours: float = 1.0
    links: LinkModel = field(default_factory=LinkModel)
    experts_per_volunteer: int = 4
    grid: tuple[int, int] = (64, 64)


def pct(xs: list[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank) of ``xs``; None when empty."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


async def join(net: SimNetwork, peer: SimPeer, bootstraps: list[SimPeer]) -> None:
    """``SwarmNode.bootstrap_once`` (+ ``set_dht_server`` for a public peer) in the simulator."""
    for b in bootstraps:
        if b.alive and b is not peer:
            await peer.rt.add_peer(PeerInfo(b.peer_id, []))
    await net.lookup(peer, peer.peer_id.to_bytes(), serial=("join", peer.index, 0))
    if peer.public and peer.alive:
        peer.server = True
        await net.lookup(peer, peer.peer_id.to_bytes(), serial=("join", peer.index, 1))


async def build(net: SimNetwork, spec: SwarmSpec) -> list[SimPeer]:
    """Grow the swarm to ``spec.peers`` (step 1); return the bootstrap peers."""
    bootstraps = []
    for _ in range(min(spec.bootstrap, spec.peers)):
        peer = net.new_peer(public=True)
        peer.server = True
        bootstraps.append(peer)
    for b in bootstraps:
        await join(net, b, bootstraps)
    for _ in range(spec.peers - len(bootstraps)):
        await trio.sleep(spec.join_gap_s)
        await join(net, net.new_peer(), bootstraps)
    return bootstraps


def _key(tag: str, i: int) -> bytes:
    """A registry-shaped DHT key (``records.dht_key``) for the i-th measured record."""
    return records.dht_key("sim", f"{tag}{i}.").encode()


async def _publish(net: SimNetwork, pub: SimPeer, key: bytes,
                   serial: object) -> tuple[set, list, LookupTrace]:
    trace = await net.lookup(pub, key, serial=serial)
    holders = trace.peers[: dht_store.REPLICATION]
    return set(holders), holders, trace


async def _read(net: SimNetwork, reader: SimPeer, key: bytes, holders: set,
                serial: object) -> tuple[bool, float, LookupTrace]:
    trace = await net.lookup(reader, key, serial=serial)
    live = {p for p in holders if net.peers[p].alive}
    ok = bool(set(trace.peers[: dht_store.REPLICATION]) & live)
    truth = net.true_closest(key, dht_routing.MAX_QUERY_PEERS)
    recall = len(set(trace.peers) & set(truth)) / len(truth) if truth else 0.0
    return ok, recall, trace


async def static_lookups(net: SimNetwork, spec: SwarmSpec, rng: random.Random) -> dict:
    """Step 2: publish + read pairs with no churn."""
    ok: list[bool] = []
    recall: list[float] = []
    reads: list[LookupTrace] = []
    warm: list[LookupTrace] = []
    for i in range(spec.lookups):
        live = net.live()
        holders, _order, _t = await _publish(net, rng.choice(live), _key("s", i), ("spub", i))
        reader = rng.choice(live)
        good, rec, trace = await _read(net, reader, _key("s", i), holders, ("sread", i))
        ok.append(good)
        recall.append(rec)
        reads.append(trace)
        # the same read again: its connections are open now (what a repeated lookup costs)
        warm.append(await net.lookup(reader, _key("s", i), serial=("swarm", i)))
    return {"ok": ok, "recall": recall, "reads": reads, "warm": warm}


async def churn_lookups(net: SimNetwork, spec: SwarmSpec, rng: random.Random,
                        bootstraps: list[SimPeer]) -> dict:
    """Step 3: replacements at their instants, publishes, and reads one heartbeat later.

    Joins, publishes and reads run as concurrent tasks (a 10,000-peer swarm replaces a peer
    every few seconds, while a join can take longer than that); the driver only acts at the
    events' instants. Choices made inside tasks draw from ``clock.unit`` by name.
    """
    hb = constants()["heartbeat_s"]
    check_ask = int(constants()["check_ask"])
    start, span = now(), spec.churn_hours * 3600.0
    events = [(t, "replace", 0) for t in spec.churn.events(spec.peers, start, span)]
    events += [(start + rng.uniform(0, max(0.0, span - hb)), "publish", i)
               for i in range(spec.churn_lookups)]
    events.sort()
    ok: list[bool] = []
    recall: list[float] = []
    checks_ok: list[bool] = []
    reads: list[LookupTrace] = []
    replaced = 0
    keep = {b.index for b in bootstraps}

    async def publish_then_read(i: int, pub: SimPeer) -> None:
        key = _key("c", i)
        holders, order, _t = await _publish(net, pub, key, ("cpub", i))
        await trio.sleep(hb)
        checks_ok.append(all(net.peers[p].alive for p in order[:check_ask]))
        live = net.live()
        reader = live[int(unit(net.seed, "reader", i) * len(live))]
        good, rec, trace = await _read(net, reader, key, holders, ("cread", i))
        ok.append(good)
        recall.append(rec)
        reads.append(trace)

    async with trio.open_nursery() as nursery:
        for t, kind, i in events:
            if t > now():
                await trio.sleep_until(t)
            if kind == "replace":
                net.kill(rng.choice([p for p in net.live() if p.index not in keep]))
                nursery.start_soon(join, net, net.new_peer(), bootstraps)
                replaced += 1
            else:
                nursery.start_soon(publish_then_read, i, rng.choice(net.live()))
    # tasks finish in virtual-time order, which the seed fixes: sort for a stable record
    reads.sort(key=lambda t: (t.seconds, t.queries))
    return {"ok": ok, "recall": recall, "reads": reads, "checks_ok": checks_ok,
            "replaced": replaced}


def _mean(xs: list) -> float | None:
    return statistics.fmean(xs) if xs else None


async def _measure(spec: SwarmSpec, seed: int) -> dict:
    rng = random.Random(seed)
    net = SimNetwork(seed, spec.links)
    bootstraps = await build(net, spec)
    built_queries = net.stats.find_node
    static = await static_lookups(net, spec, rng)
    churn = await churn_lookups(net, spec, rng, bootstraps)
    reads = static["reads"]
    servers = len(net.live_servers())
    lookup_queries = _mean([t.queries for t in reads + churn["reads"]]) or 0.0
    loss_ok = (1.0 - spec.links.query_loss) ** int(constants()["check_ask"])
    check_fail = 1.0 - (_mean([float(c) for c in churn["checks_ok"]]) or 1.0) * loss_ok
    keys = _mean([example_keys(rng, spec.experts_per_volunteer, spec.grid) for _ in range(200)])
    tables = [p.rt.size() for p in net.live()]
    buckets = _mean([sum(1 for b in p.rt.buckets if b.size()) for p in net.live()]) or 0.0
    traffic = upkeep_per_minute(peers=spec.peers, servers=servers, keys_per_volunteer=keys or 0.0,
                                lookup_queries_mean=lookup_queries, check_fail_p=check_fail,
                                buckets_mean=buckets, sizes=message_bytes())
    row = {
        "peers": spec.peers,
        "dht_servers": servers,
        "lookup_hops_p50": pct([t.rounds for t in reads], 50),
        "lookup_hops_p99": pct([t.rounds for t in reads], 99),
        "lookup_ms_p50": _ms(pct([t.seconds for t in reads], 50)),
        "lookup_ms_p99": _ms(pct([t.seconds for t in reads], 99)),
        "lookup_ms_p50_warm": _ms(pct([t.seconds for t in static["warm"]], 50)),
        "lookup_ms_p99_warm": _ms(pct([t.seconds for t in static["warm"]], 99)),
        "lookup_queries_mean": _mean([t.queries for t in reads]),
        "lookup_timeouts_mean": _mean([t.timeouts for t in reads]),
        "lookup_success": _mean([float(x) for x in static["ok"]]),
        "lookup_recall": _mean(static["recall"]),
        "lookup_success_churn": _mean([float(x) for x in churn["ok"]]),
        "lookup_recall_churn": _mean(churn["recall"]),
        "lookup_hops_p50_churn": pct([t.rounds for t in churn["reads"]], 50),
        "lookup_ms_p50_churn": _ms(pct([t.seconds for t in churn["reads"]], 50)),
        "lookup_ms_p99_churn": _ms(pct([t.seconds for t in churn["reads"]], 99)),
        "lookup_timeouts_mean_churn": _mean([t.timeouts for t in churn["reads"]]),
        "churn_replaced": churn["replaced"],
        "check_fail_p": check_fail,
        "keys_per_volunteer": keys,
        "routing_table_p50": pct([float(x) for x in tables], 50),
        "routing_buckets_mean": buckets,
        "build_find_node_per_join": built_queries / max(1, spec.peers),
    }
    row.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in traffic.items()})
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def measure_dht(spec: SwarmSpec, seed: int) -> dict:
    """Build the swarm and measure it (steps 1-3) under a virtual clock; one row of figures."""
    return run_virtual(_measure, spec, seed)

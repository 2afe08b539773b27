"""DHT traffic per volunteer per minute, implied by the product's upkeep constants.

Every volunteer re-announces each DHT key it serves under every heartbeat
(``NetworkConfig().heartbeat_s``: half of ``registry.DEFAULT_TTL`` unless configured). One
announce of one key (``dht_store.publish_value``) is ``cached_closest_peers`` then
``REPLICATION`` PUT_VALUE requests. ``cached_closest_peers`` (``dht_routing``) uses a cached
closest set unchecked while it is younger than ``CLOSEST_FRESH_S``, checks it with
``CHECK_ASK`` FIND_NODE requests while younger than ``CLOSEST_TTL`` (a check renews its age),
and runs a full lookup when older or when one of the checked peers does not answer.

Every constant is read from the product's modules at call time (never copied), so the
figures follow the code. What the simulator measures goes in as arguments: the FIND_NODE
requests of one full lookup (mean) and the chance that a check fails (a checked peer gone
or its request lost). All requests go to DHT servers (only they are asked), so each server
receives the swarm's requests divided by the number of servers. ``keys_per_volunteer``
comes from ``registry.group_children`` of an assumed assignment (``example_keys``): a
volunteer serving E experts of a 2-D grid announces the grid's root prefix and one row
prefix per row it serves. The root prefix is announced by *every* volunteer: its
``REPLICATION`` holders each receive one PUT per volunteer per heartbeat.

On top of that, py-libp2p's ``KadDHT`` (servers and clients alike) refreshes its routing
table every ``ROUTING_TABLE_REFRESH_INTERVAL``: a lookup of its own id and one of a random key
in each non-empty bucket (its own ``find_closest_peers_network``; counted here at the
simulator's requests per lookup, an approximation).
"""

from __future__ import annotations

import math
import random

from libp2p.kad_dht import kad_dht

from volunteer.net import dht_routing, dht_store
from volunteer.net.config import NetworkConfig
from volunteer.net.registry import DEFAULT_TTL, group_children


def example_keys(rng: random.Random, experts: int, grid: tuple[int, int]) -> int:
    """DHT keys one volunteer writes each heartbeat when it serves ``experts`` random uids of
    ``grid``: one per prefix it announces, plus the grid root's shard key
    (``key_shards.write_keys``: a daemon never reads the root's base key, so it writes both
    keys there; the row prefixes it reads cost one key each, two for the few nodes a full
    row's base key lists, which this count leaves out)."""
    uids = {f"ffn.{rng.randrange(grid[0])}.{rng.randrange(grid[1])}" for _ in range(experts)}
    return len(group_children(sorted(uids))) + 1


def constants() -> dict[str, float]:
    """The upkeep constants as the product defines them now."""
    return {
        "record_ttl_s": DEFAULT_TTL,
        "heartbeat_s": NetworkConfig().heartbeat_s,
        "replication": dht_store.REPLICATION,
        "alpha": dht_routing.ALPHA,
        "lookup_count": dht_routing.MAX_QUERY_PEERS,
        "closest_fresh_s": dht_routing.CLOSEST_FRESH_S,
        "closest_ttl_s": dht_routing.CLOSEST_TTL,
        "check_ask": dht_routing.CHECK_ASK,
        "query_timeout_s": dht_routing.QUERY_TIMEOUT,
        "table_refresh_s": float(kad_dht.ROUTING_TABLE_REFRESH_INTERVAL),
    }


def upkeep_per_minute(*, peers: int, servers: int, keys_per_volunteer: float,
                      lookup_queries_mean: float, check_fail_p: float,
                      buckets_mean: float,
                      sizes: dict[str, int] | None = None) -> dict[str, float]:
    """Requests per minute: sent by one volunteer, received by one DHT server, received by
    one holder of the grid's root key (see module docstring). ``buckets_mean``: non-empty
    k-buckets per routing table (each costs a refresh lookup). ``sizes``
    (``wire_sizes.message_bytes()``) adds kilobytes per minute, both directions: a FIND_NODE
    is a request and a reply of ``BUCKET_SIZE`` peers, a PUT the entry and a key-sized ack."""
    c = constants()
    hb = c["heartbeat_s"]
    announces = 60.0 / hb
    if hb >= c["closest_ttl_s"]:
        checks, fulls = 0.0, 1.0  # the cached set is always too old: a full lookup each time
    else:
        # a check every ceil(fresh / hb) heartbeats (a check renews the cached set's age)
        checks = 1.0 / max(1, math.ceil(c["closest_fresh_s"] / hb))
        fulls = checks * check_fail_p
    find_node = keys_per_volunteer * announces * (checks * c["check_ask"]
                                                  + fulls * lookup_queries_mean)
    put = keys_per_volunteer * announces * c["replication"]
    refresh = (1.0 + buckets_mean) * 60.0 / c["table_refresh_s"] * lookup_queries_mean
    sent = find_node + put + refresh
    out: dict[str, float] = {}
    if sizes is not None:
        fn_bytes = sizes["find_node_request"] + sizes["find_node_reply"]
        put_bytes = sizes["put_value"] + sizes["find_node_request"]
        kb = ((find_node + refresh) * fn_bytes + put * put_bytes) / 1000.0
        out = {"dht_kb_per_volunteer_per_min": kb,
               "dht_kb_per_server_per_min": kb * peers / max(1, servers)}
    return out | {
        "announces_per_min": announces,
        "find_node_per_volunteer_per_min": find_node,
        "put_per_volunteer_per_min": put,
        "refresh_find_node_per_volunteer_per_min": refresh,
        "dht_msgs_per_volunteer_per_min": sent,
        "dht_msgs_per_server_per_min": sent * peers / max(1, servers),
        "root_key_puts_per_holder_per_min": peers * announces,
    }

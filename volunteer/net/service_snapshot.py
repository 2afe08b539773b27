"""The network service's status snapshot: plain, JSON-serialisable values built in the
network thread from loop-owned state (peers, routing table, DHT mode, announces, the
RPC/DHT guards' counters, records dropped by reason, admission, NAT).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from volunteer.net import libp2p_adapter as lp
from volunteer.net.dht_routing import routing_stats

if TYPE_CHECKING:
    from volunteer.net.node import SwarmNode
    from volunteer.net.service import NetworkService

log = logging.getLogger(__name__)


def service_snapshot(svc: NetworkService) -> dict:
    """The dashboard's network section for ``svc``; reads loop-owned state, so the caller
    runs it in the network thread (``NetworkService.snapshot`` does)."""
    node = svc.node
    nat_snap: dict = {}
    if svc.nat is not None:
        try:
            nat_snap = svc.nat.snapshot()
        except Exception as e:
            nat_snap = {"error": f"{type(e).__name__}: {e}"}
    peers = nat_snap.get("connections") or count_connections(node)
    boot = node.bootstrap_state if node is not None else None
    last = svc.last_announce
    return {
        "peer_id": svc.peer_id,
        "addrs": svc._multiaddrs_now(),
        "experiment": svc.experiment,
        "reachability": svc.reachability,
        "relay": nat_snap.get("relay"),
        "relay_addrs": nat_snap.get("relay_addrs", []),
        "peers": {k: int(peers.get(k, 0)) for k in ("direct", "relayed", "hole_punched")},
        "connected_peers": len(node.host.get_connected_peers()) if node is not None else 0,
        "routing_table": routing_table_size(node),
        "dht_mode": "server" if svc._dht_server_now() else "client",
        "bootstrap": {"peers": len(svc.config.bootstrap), "attempts": boot.attempts if boot else 0,
                      "successes": boot.successes if boot else 0,
                      "last_error": boot.last_error if boot else None},
        "new_swarm": svc.config.new_swarm,
        "records_announced": svc.registry.records_announced if svc.registry else 0,
        "announced_uids": len(svc._uids),
        "state": svc._state,
        "last_announce_ok": last.ok if last is not None else None,
        # DHT servers holding the entry of this node's worst-stored key (itself included)
        "last_announce_copies": min(last.stored.values(), default=0) if last is not None else None,
        "heartbeats": svc.heartbeats,
        "zmq_endpoint": svc.zmq_endpoint,
        "rpc": svc.rpc.stats.as_dict() if svc.rpc is not None else None,
        "dht_guard": svc.dht_guard.stats.as_dict() if svc.dht_guard is not None else None,
        "dht_routing": dict(routing_stats(node.dht)) if node is not None else {},
        "records_dropped": svc.record_policy.stats.as_dict(),
        "admission": "open" if svc.admission.open else "closed",
        "shard_server": svc.shard_server.stats.as_dict() if svc.shard_server is not None else None,
        "nat": {k: v for k, v in nat_snap.items() if k not in ("connections",)},
    }


def count_connections(node: SwarmNode | None) -> dict[str, int]:
    """Direct / relayed connection counts (when NAT traversal is off: no ledger to ask)."""
    try:
        return lp.connection_counts(node.host) if node is not None else {}
    except lp.Libp2pInternalsError as e:  # the dashboard goes on without the counts
        log.warning("%s", e)
        return {}


def routing_table_size(node: SwarmNode | None) -> int:
    try:
        return lp.routing_table_size(node.dht) if node is not None else 0
    except lp.Libp2pInternalsError as e:
        log.warning("%s", e)
        return 0

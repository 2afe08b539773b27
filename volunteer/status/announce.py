"""Whether the node's experts are announced in the DHT: one rule for the log and the status.

The daemon writes its records into the DHT of the peers it is connected to; with no peer
connected they are stored nowhere that others can read, unless the node founded a new swarm
(nobody else exists yet, so its own DHT is the swarm's). ``announced_where(net)`` applies that
rule to the network section of a snapshot (``NetworkService.snapshot()``): the daemon's ready
line (``volunteer.daemon.network.announce_line``) and the status view's ``dht`` row both use it,
so they can never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

IN_THE_DHT = "the DHT"
IN_A_NEW_SWARM = "this node's DHT (a new swarm)"
NOT_ANNOUNCED = "connected to no peer"


def announced_where(net: Mapping[str, Any] | None) -> str | None:
    """Where the experts are announced (``IN_THE_DHT`` or ``IN_A_NEW_SWARM``), or None when they
    are not: no peer connected and the node did not start a new swarm. Odd values count as 0."""
    snap = net if isinstance(net, Mapping) else {}
    peers = snap.get("connected_peers")
    connected = isinstance(peers, (int, float)) and not isinstance(peers, bool) and peers > 0
    if connected:
        return IN_THE_DHT
    return IN_A_NEW_SWARM if bool(snap.get("new_swarm")) else None

"""The supervisor's peer network: join it once the runtime serves, and stop it.

``join_network(sup)`` starts the ``NetworkService`` (``volunteer.daemon.network``) with the
node's shard server, the runtime's serving limits and the volunteer's bandwidth caps, and
wraps it so every announce made while the node is paused says "paused". It runs once the
runtime serves, so the first request routed here through the DHT can be answered; it
raises ``NetworkStartError`` (one line) when the network cannot start, and the caller exits.
``stop_network(network)`` closes the shard transports and stops the service; never raises.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from volunteer.daemon.network import start_network
from volunteer.daemon.pause import PausedNetwork

log = logging.getLogger("volunteer.daemon.supervisor")


def join_network(sup: Any) -> None:
    """Set ``sup.network`` (None when ``network_enabled`` is false), ``sup.shard_server`` and
    ``sup.network_ready_s``."""
    sup.network = None
    if not sup.settings.network_enabled:
        log.info("peer network disabled (network_enabled=false): serving over ZeroMQ only")
        return
    m, s = sup.manifest, sup.settings
    started = time.monotonic()
    from volunteer.net.shard_rpc import ShardServer

    assert sup.shards is not None
    sup.shard_server = ShardServer(sup.shards.cache, adopt=sup.shards.adopt)
    # The same ServingLimits object the runtime (and its ZeroMQ frontend) enforces: the
    # libp2p RPC server refuses exactly what the ZeroMQ frontend refuses.
    network = start_network(sup.home.root, m.experiment.name, m.network, sup.runtime.submit,
                            sup.endpoint, s.listen_host, [], sup.network_load(),
                            shard_server=sup.shard_server, limits=sup.runtime.limits,
                            admission=m.admission)
    # Shards also travel over ZeroMQ: served from the runtime's socket, fetched from
    # publicly reachable holders over plain TCP (chunks are verified whatever the path).
    from volunteer.client.zmq_transport import ZmqTransport

    sup.runtime.side = (sup.shard_server.accepts, sup.shard_server.submit)
    network.shards.set_direct_transport(ZmqTransport)
    if sup.traffic is not None:  # the caps hold on libp2p expert calls and shard transfers too
        if network.rpc is not None:
            network.rpc.traffic = sup.traffic
        network.shards.set_traffic(sup.traffic)
    sup.network = PausedNetwork(network, lambda: sup.pause.paused)  # records say "paused"
    sup.network_ready_s = time.monotonic() - started


def stop_network(network: Any) -> None:
    """Close the pooled direct shard transports, then stop the service (logged, never raised)."""
    if network is None:
        return
    if network.shards is not None:
        network.shards.close()
    try:
        network.stop()
    except Exception:
        log.exception("stopping the network service failed")

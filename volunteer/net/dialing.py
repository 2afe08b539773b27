"""Reach a peer by the addresses of its signed record: direct first, else through its relay.

One definition for the trainer's ``ClientNode`` and the volunteer's ``NetworkService`` (shard
downloads and hand-offs between volunteers take the same paths as expert calls):
``dial(host, nat, peer_id, addrs)`` opens a connection when none exists. With a running
``NatTraversal`` that has a relay client, ``NatTraversal.connect`` tries the direct addresses,
then the ``/p2p-circuit`` ones, and waits up to ``upgrade_timeout`` s for a DCUtR hole punch;
without one, only the direct addresses are dialled (py-libp2p's dialer skips circuits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import multiaddr
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

if TYPE_CHECKING:  # the NAT stack is imported by whoever builds a NatTraversal
    from volunteer.net.nat.traversal import NatTraversal


def full_addrs(peer_id: ID, addrs: Sequence[str]) -> list[str]:
    """Each address ending in ``/p2p/<peer id>`` (records may carry bare transport addresses)."""
    return [a if "/p2p/" in a else f"{a}/p2p/{peer_id.to_base58()}" for a in addrs]


def dialable(addrs: Sequence[str]) -> list[multiaddr.Multiaddr]:
    """Transport parts of the direct addresses (the swarm's dialer cannot use circuits)."""
    return [multiaddr.Multiaddr(a.split("/p2p/")[0]) for a in addrs if "/p2p-circuit" not in a]


async def dial(host: IHost, nat: NatTraversal | None, peer_id: ID, addrs: Sequence[str], *,
               timeout: float, upgrade_timeout: float) -> None:
    """Make sure a connection to ``peer_id`` exists (see module docstring); raises if none.

    ``nat``: the node's running ``NatTraversal``, or None (no NAT traversal, or not up yet).
    """
    full = full_addrs(peer_id, addrs)
    if nat is None or nat.relay_node is None:
        await host.connect(PeerInfo(peer_id, dialable(full)))
        return
    conn = await nat.connect(full, timeout=timeout, upgrade_timeout=upgrade_timeout)
    if conn is None:
        raise ConnectionError(f"no direct or relayed route to {peer_id}")

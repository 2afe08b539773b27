"""What kind of connection is this? Direct, relayed, or direct after a hole punch.

py-libp2p marks relayed connections with ``/p2p-circuit`` transport addresses (and
``ConnectionType.RELAYED``) but keeps no record of *how* a direct connection came to be.
``ConnectionLedger`` is a network notifee that labels a direct connection *hole-punched*
when it opens while a DCUtR session with that peer is in progress (the only way two
NATed peers get a direct connection); ``classify_connections`` then counts a host's
connections as direct / relayed / hole-punched for the dashboard and the NAT lab.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.connection_types import ConnectionType
from multiaddr import Multiaddr

DIRECT = "direct"
RELAYED = "relayed"
HOLE_PUNCHED = "hole_punched"


def transport_addrs(conn: Any) -> list[str]:
    """The connection's actual transport addresses as strings (never peerstore guesses)."""
    addrs = getattr(conn, "_actual_transport_addresses", None)
    if addrs is None:
        muxed = getattr(conn, "muxed_conn", None)
        getter = getattr(muxed, "get_transport_addresses", None)
        try:
            addrs = getter() if callable(getter) else []
        except Exception:
            addrs = []
    return [str(a) for a in addrs or []]


def is_relayed(conn: Any) -> bool:
    """True for a connection carried over a Circuit Relay v2 circuit."""
    getter = getattr(conn, "get_connection_type", None)
    with contextlib.suppress(Exception):
        if callable(getter) and getter() == ConnectionType.RELAYED:
            return True
    return any("/p2p-circuit" in a for a in transport_addrs(conn))


def remote_ip_port(conn: Any) -> tuple[str, int] | None:
    """The remote (ip, port) of a direct connection, None for relayed or unknown ones."""
    if is_relayed(conn):
        return None
    for a in transport_addrs(conn):
        try:
            ma = Multiaddr(a)
            ip = ma.value_for_protocol("ip4")
            port = ma.value_for_protocol("tcp")
        except Exception:
            continue
        if ip and port:
            return str(ip), int(port)
    muxed = getattr(conn, "muxed_conn", None)
    getter = getattr(muxed, "get_remote_address", None)
    with contextlib.suppress(Exception):
        got = getter() if callable(getter) else None
        if got:
            return str(got[0]), int(got[1])
    return None


def _open_connections(host: IHost) -> Iterable[tuple[Any, Any]]:
    conns = getattr(host.get_network(), "connections", {}) or {}
    for peer_id, value in list(conns.items()):
        items = value if isinstance(value, list) else [value]
        for conn in items:
            if conn is not None and not getattr(conn, "is_closed", False):
                yield peer_id, conn


class ConnectionLedger(INotifee):
    """Remembers which direct connections were opened by a hole punch.

    ``punching(peer_id)`` tells whether a hole punch with that peer is under way; it is
    asked at the moment a connection opens (``connected`` runs inside the swarm's
    ``add_conn``, while the DCUtR session that dialled it is still open).
    """

    def __init__(self, punching: Callable[[Any], bool]) -> None:
        self._punching = punching
        self._hole_punched: dict[int, str] = {}  # id(conn) -> peer id (base58)
        self.hole_punches = 0  # total connections ever labelled hole-punched

    def is_hole_punched(self, conn: Any) -> bool:
        return id(conn) in self._hole_punched

    def kind(self, conn: Any) -> str:
        if is_relayed(conn):
            return RELAYED
        return HOLE_PUNCHED if self.is_hole_punched(conn) else DIRECT

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        if is_relayed(conn):
            return
        peer_id = conn.muxed_conn.peer_id
        try:
            punching = bool(self._punching(peer_id))
        except Exception:
            punching = False
        if punching:
            self._hole_punched[id(conn)] = peer_id.to_base58()
            self.hole_punches += 1

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._hole_punched.pop(id(conn), None)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None

    def describe(self, host: IHost) -> list[dict]:
        """One dict per open connection: peer, kind, remote address (for status/tests)."""
        out = []
        for peer_id, conn in _open_connections(host):
            remote = remote_ip_port(conn)
            out.append({
                "peer": peer_id.to_base58(),
                "kind": self.kind(conn),
                "remote": f"{remote[0]}:{remote[1]}" if remote else None,
                "addrs": transport_addrs(conn)[:4],
            })
        return out

    def counts(self, host: IHost) -> dict[str, int]:
        """Open connections by kind: ``{"direct": n, "relayed": n, "hole_punched": n}``."""
        counts = {DIRECT: 0, RELAYED: 0, HOLE_PUNCHED: 0}
        for _peer, conn in _open_connections(host):
            counts[self.kind(conn)] += 1
        return counts

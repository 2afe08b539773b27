"""Every reach into py-libp2p beyond its documented interfaces, in one module.

``volunteer.net`` needs a few things py-libp2p 0.8.1 keeps to itself: the TCP socket under a
connection (to really close it), DCUtR's per-peer bookkeeping, the relay transport's
reservations, the KadDHT's mode / routing table / value store, and the swarm's connection
table. Reached with ``getattr(..., None)`` chains scattered over many files, an upgrade that
renames one of them would silently turn a feature off. Here each reach is one named
function that accesses the attribute directly and raises ``Libp2pInternalsError`` (naming
the reach and the versions it was verified against) when it is gone; callers that can do
without (the dashboard's connection counts) catch that one error, log it and carry on.

``tests/net/test_libp2p_adapter.py`` exercises every function against real hosts and real
py-libp2p objects, so an upgrade that moves any of these internals fails that test loudly;
``VERIFIED_VERSIONS`` lists the py-libp2p versions the reaches were checked against (the
test fails on any other version until someone re-verifies and adds it).

Our own state that belongs to a py-libp2p object (a connection tracker per host, stream
sessions and a lookup cache per DHT) lives in ``side_state``, a weak side table, instead of
attributes set on py-libp2p's objects.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from importlib import metadata
from typing import Any, TypeVar

import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID

VERIFIED_VERSIONS = ("0.8.1",)
T = TypeVar("T")


class Libp2pInternalsError(RuntimeError):
    """A py-libp2p internal this module relies on is gone or changed (after an upgrade)."""


def libp2p_version() -> str:
    """The installed py-libp2p version ("unknown" when the metadata is missing)."""
    try:
        return metadata.version("libp2p")
    except metadata.PackageNotFoundError:
        return "unknown"


def _reach(obj: Any, attr: str, what: str) -> Any:
    """``obj.attr``, or ``Libp2pInternalsError`` naming the reach when it is gone."""
    try:
        return getattr(obj, attr)
    except AttributeError:
        raise Libp2pInternalsError(
            f"py-libp2p {libp2p_version()}: {what} ({type(obj).__name__}.{attr}) is gone; "
            f"volunteer.net.libp2p_adapter was verified against {', '.join(VERIFIED_VERSIONS)}"
        ) from None


# ---------------------------------------------------------------- connections


def connections_by_peer(host: IHost) -> dict[ID, list[INetConn]]:
    """The swarm's connection table: peer id -> its connections (a copy)."""
    table = _reach(host.get_network(), "connections", "the swarm's connection table")
    return {pid: list(v) if isinstance(v, list) else [v] for pid, v in list(table.items())}


def open_connections(host: IHost) -> list[tuple[ID, INetConn]]:
    """(peer id, connection) for every connection of ``host`` that is not closed."""
    return [(pid, c) for pid, conns in connections_by_peer(host).items() for c in conns
            if c is not None and not is_closed(c)]


def is_closed(conn: INetConn) -> bool:
    """Whether the connection is closed (a property in 0.8.1)."""
    return bool(_reach(conn, "is_closed", "a connection's closed flag"))


def transport_addrs(conn: INetConn) -> list[str]:
    """The connection's actual transport addresses (``/p2p-circuit`` ones when relayed)."""
    return [str(a) for a in _reach(conn, "get_transport_addresses", "connection addresses")()]


def is_relayed(conn: INetConn) -> bool:
    """True for a connection carried over a Circuit Relay v2 circuit."""
    if _reach(conn, "get_connection_type", "connection type")() == ConnectionType.RELAYED:
        return True
    return any("/p2p-circuit" in a for a in transport_addrs(conn))


def connection_counts(host: IHost) -> dict[str, int]:
    """How many open connections are direct and how many relayed (telling hole-punched
    ones apart needs the NAT ledger, ``volunteer.net.nat.connections``)."""
    counts = {"direct": 0, "relayed": 0}
    for _, conn in open_connections(host):
        counts["relayed" if is_relayed(conn) else "direct"] += 1
    return counts


def muxed_conn_of(stream_or_conn: INetStream | INetConn) -> Any:
    """The muxed (yamux) connection under a stream or a swarm connection."""
    return _reach(stream_or_conn, "muxed_conn", "the muxed connection")


def connection_of_stream(host: IHost, peer_id: ID, stream: INetStream) -> INetConn | None:
    """The swarm connection that carries ``stream`` (None when it closed meanwhile)."""
    muxed = muxed_conn_of(stream)
    for conn in host.get_network().get_connections(peer_id):
        if muxed_conn_of(conn) is muxed:
            return conn
    return None


def stream_peer_id(stream: INetStream) -> ID:
    """The remote peer of a stream."""
    return _reach(muxed_conn_of(stream), "peer_id", "a stream's remote peer id")


def stream_transport_addrs(stream: INetStream) -> list[str]:
    """Transport addresses of the connection under ``stream``."""
    getter = _reach(muxed_conn_of(stream), "get_transport_addresses", "stream connection addresses")
    return [str(a) for a in getter()]


def remote_address(stream_or_conn: INetStream | INetConn) -> tuple[str, int] | None:
    """The remote (ip, port) the muxer reports for a stream or connection, if any."""
    got = _reach(muxed_conn_of(stream_or_conn), "get_remote_address", "remote address")()
    return (str(got[0]), int(got[1])) if got else None


SOCKET_PATH = ("muxed_conn", "secured_conn", "conn", "conn", "stream", "stream", "socket")
"""SwarmConn -> Yamux -> SecureSession -> RawConnection -> TCPStream -> trio SocketStream
-> trio socket (0.8.1)."""


def tcp_socket(conn: INetConn) -> Any:
    """The trio socket under a TCP connection, None for one that is not TCP (a circuit).

    py-libp2p 0.8.1 can drop a connection from its tables without closing the socket, so
    ``close_all_connections`` closes the socket itself.
    """
    if is_relayed(conn):
        return None
    obj: Any = conn
    for attr in SOCKET_PATH:
        obj = _reach(obj, attr, "the TCP socket under a connection")
    return obj


# ---------------------------------------------------------------- NAT: DCUtR and relay


def dcutr_in_progress(dcutr: Any, peer_id: ID) -> bool:
    """Whether a DCUtR (hole punch) session with ``peer_id`` is under way."""
    return peer_id in _reach(dcutr, "_in_progress", "DCUtR sessions in progress")


def dcutr_forget_attempts(dcutr: Any, peer_id: ID) -> None:
    """Reset DCUtR's attempt budget for ``peer_id`` so it may punch again."""
    _reach(dcutr, "_hole_punch_attempts", "DCUtR attempt budget").pop(peer_id, None)


def relay_reservations(transport: Any) -> list[ID]:
    """Relays on which the Circuit v2 transport holds a reservation."""
    return list(_reach(transport, "_reservations", "relay reservations"))


RELAY_DATA_PARAMS = ("self", "src_stream", "dst_stream", "peer_id", "deadline", "circuit_data_limit")


def check_relay_protocol(cls: type) -> None:
    """Check what ``nat/relay.py``'s CircuitV2Protocol subclass overrides: ``_relay_data``
    with this signature, and ``_active_relays`` set by the constructor (checked on an
    instance by the test). Raises ``Libp2pInternalsError`` when it changed."""
    relay_data = _reach(cls, "_relay_data", "the relay's data pump")
    params = tuple(inspect.signature(relay_data).parameters)
    if params != RELAY_DATA_PARAMS:
        raise Libp2pInternalsError(f"py-libp2p {libp2p_version()}: {cls.__name__}._relay_data takes "
                                   f"{params}, expected {RELAY_DATA_PARAMS}")


def active_relays(protocol: Any) -> dict:
    """The relay protocol's table of active circuits (key -> (src stream, dst stream))."""
    return _reach(protocol, "_active_relays", "active relay circuits")


# ---------------------------------------------------------------- Kademlia DHT


def dht_is_server(dht: KadDHT) -> bool:
    """True while the DHT runs in server mode."""
    return _reach(dht, "mode", "the DHT mode") == DHTMode.SERVER


def routing_table(dht: KadDHT) -> Any:
    """The DHT's routing table (``find_local_closest_peers``, ``remove_peer``, ...)."""
    return _reach(dht, "routing_table", "the DHT routing table")


def routing_table_size(dht: KadDHT) -> int:
    """How many peers the DHT's routing table holds."""
    return int(_reach(dht, "get_routing_table_size", "the routing table size")())


def replace_value_store(dht: KadDHT, store: Any) -> None:
    """Install ``store`` as the DHT's value store (after checking there is one to replace)."""
    _reach(dht, "value_store", "the DHT value store")
    dht.value_store = store


def value_store(dht: KadDHT) -> Any:
    """The DHT's value store."""
    return _reach(dht, "value_store", "the DHT value store")


# ---------------------------------------------------------------- our state on their objects

_SIDE: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def side_state(owner: Any, name: str, factory: Callable[[], T]) -> T:
    """Our per-object state for a py-libp2p object (created by ``factory`` on first use),
    kept in a weak side table rather than as an attribute set on their object."""
    slots = _SIDE.setdefault(owner, {})
    if name not in slots:
        slots[name] = factory()
    return slots[name]


def peek_side_state(owner: Any, name: str) -> Any:
    """The state ``side_state`` stored for ``owner`` under ``name``, or None."""
    return _SIDE.get(owner, {}).get(name)


async def stop_auto_connector(host: IHost, wait_s: float = 5.0) -> None:
    """Stop py-libp2p's auto-connector on a running host.

    It dials every peer the peerstore knows until the node holds ~150 connections (the
    midpoint of its watermarks), so every node of a swarm ends up connected to every other:
    N^2 handshakes as a swarm grows, measured at a tenth of each daemon's CPU while 64 joined
    on one machine. A volunteer connects on demand instead (DHT neighbours, trainers, the
    peers it exchanges with). The swarm starts the connector in its own background task, so
    this waits (at most ``wait_s``) until it has started, then stops it; a stopped one also
    ignores the re-dial py-libp2p schedules on every disconnect."""
    connector = _reach(host.get_network(), "auto_connector", "the swarm's auto-connector")
    with trio.move_on_after(wait_s):
        while not getattr(connector, "_started", True):
            await trio.sleep(0.01)
    await connector.stop()

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
import struct
import weakref
from collections.abc import Callable
from importlib import metadata
from typing import Any, TypeVar

import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.stream.net_stream import NetStream, StreamState
from libp2p.peer.id import ID
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH as NOISE_MAX_PLAINTEXT
from libp2p.stream_muxer.yamux.yamux import HEADER_SIZE as YAMUX_HEADER_SIZE
from libp2p.stream_muxer.yamux.yamux import MAX_MESSAGE_SIZE as YAMUX_MAX_MESSAGE
from libp2p.stream_muxer.yamux.yamux import YamuxStream

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


# ---------------------------------------------------------------- yamux fast path
#
# py-libp2p 0.8.1 spends ~0.5 ms of CPU per small message on each side of a stream: every
# ``NetStream.read`` sends a yamux WINDOW_UPDATE frame (one more noise message, TCP send
# and ``handle_incoming`` round on the peer), and each read or write takes several trio
# locks (each a scheduler round trip). Measured on loopback (2 cores), a small request and
# reply on a reused stream took 2.2 ms of CPU through ``stream.read``/``stream.write`` and
# 0.75 ms through the functions below. They do exactly what yamux does for a read or a
# write that needs no waiting and no flow-control decision, and nothing else:
#
# - ``yamux_write_frame``: one DATA frame (header + payload in one buffer, one noise
#   message) when the payload fits one noise message and the send window; else False and
#   the caller writes through ``stream.write`` (which splits, waits for window, raises).
# - ``yamux_read_some``: buffered bytes of the stream, waiting on yamux's own per-stream
#   event while none are buffered; None whenever the stream is not plainly open (EOF, reset,
#   closing, not yamux): the caller then reads through ``stream.read``, which raises the
#   right error or drains what is left.
# - ``yamux_credit``: one WINDOW_UPDATE for everything consumed and not yet credited (the
#   same ``target - (recv_window + buffered)`` yamux computes), sent only once it reaches
#   ``min_credit``; the sender keeps at least ``window - min_credit`` of credit, so batching
#   never stalls it while we read. ``stream.read`` (used for bulk bodies) credits the rest
#   and keeps yamux's window auto-tuning for large transfers.

_YAMUX_FRAME = struct.Struct("!BBHII")  # version, type, flags, stream id, length
_YAMUX_DATA, _YAMUX_WINDOW_UPDATE = 0, 1
YAMUX_FAST_MAX = min(YAMUX_MAX_MESSAGE, NOISE_MAX_PLAINTEXT) - YAMUX_HEADER_SIZE
"""Largest payload ``yamux_write_frame`` sends: one yamux frame that is one noise message."""
_WRITABLE = (StreamState.INIT, StreamState.OPEN, StreamState.CLOSE_READ)
_READABLE = (StreamState.INIT, StreamState.OPEN, StreamState.CLOSE_WRITE)


def _yamux_of(stream: INetStream) -> YamuxStream | None:
    """The yamux stream under a swarm stream (None for anything else, e.g. a test double)."""
    if not isinstance(stream, NetStream):
        return None
    muxed = _reach(stream, "muxed_stream", "the muxed stream under a stream")
    return muxed if isinstance(muxed, YamuxStream) else None


def _internals_gone(e: Exception) -> Libp2pInternalsError:
    return Libp2pInternalsError(
        f"py-libp2p {libp2p_version()}: a yamux internal used by the fast path is gone "
        f"({type(e).__name__}: {e}); volunteer.net.libp2p_adapter was verified against "
        f"{', '.join(VERIFIED_VERSIONS)}")


def has_yamux_fastpath(stream: INetStream) -> bool:
    """Whether the yamux fast path applies to ``stream`` (a yamux stream whose internals
    are where 0.8.1 keeps them; ``Libp2pInternalsError`` when they moved)."""
    ys = _yamux_of(stream)
    if ys is None:
        return False
    try:
        conn = ys.conn
        return all((isinstance(ys.send_window, int), isinstance(ys.recv_window, int),
                    isinstance(ys.target_recv_window, int), isinstance(conn._write_lock, trio.Lock),
                    callable(conn.secured_conn.write),
                    isinstance(conn.stream_buffers, dict), isinstance(conn.stream_events, dict),
                    isinstance(stream._state, StreamState)))  # type: ignore[attr-defined]
    except AttributeError as e:
        raise _internals_gone(e) from None


async def yamux_write_frame(stream: INetStream, data: bytes | bytearray | memoryview) -> bool:
    """Send ``data`` as one yamux DATA frame if it fits one noise message and the send
    window and the stream is open for writing; False (nothing sent) otherwise. Writes on
    one stream must not overlap (the callers serialise them)."""
    n = len(data)
    if not 0 < n <= YAMUX_FAST_MAX:
        return False
    ys = _yamux_of(stream)
    if ys is None:
        return False
    try:
        if (n > ys.send_window or ys.send_closed or ys.closed
                or stream._state not in _WRITABLE):  # type: ignore[attr-defined]
            return False
        ys.send_window -= n
        conn = ys.conn
    except AttributeError as e:
        raise _internals_gone(e) from None
    await _yamux_send(conn, _YAMUX_FRAME.pack(0, _YAMUX_DATA, 0, ys.stream_id, n) + data)
    return True


async def _yamux_send(conn: Any, frame: bytes) -> None:
    """What ``Yamux._write_frame`` does (one frame under the connection's write lock)
    without its per-frame debug formatting and trailing checkpoint; a free lock is taken
    without a scheduling round trip (``acquire_nowait``)."""
    try:
        lock, secured = conn._write_lock, conn.secured_conn
    except AttributeError as e:
        raise _internals_gone(e) from None
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()
    try:
        await secured.write(frame)
    finally:
        lock.release()


async def yamux_read_some(stream: INetStream, n: int) -> bytes | None:
    """Up to ``n`` (> 0) bytes buffered for ``stream``, waiting until some arrive; None
    when the stream is not plainly open (then read through ``stream.read``). Credits no
    window: call ``yamux_credit`` after."""
    ys = _yamux_of(stream)
    if ys is None:
        return None
    try:
        conn, sid = ys.conn, ys.stream_id
        while True:
            buf = conn.stream_buffers.get(sid)
            if buf:
                if len(buf) <= n:
                    data = bytes(buf)
                    buf.clear()
                else:
                    data = bytes(buf[:n])
                    del buf[:n]
                return data
            if (buf is None or ys.recv_closed or ys.reset_received or ys.closed
                    or conn.event_shutting_down.is_set()
                    or stream._state not in _READABLE):  # type: ignore[attr-defined]
                return None
            event = conn.stream_events.get(sid)
            if event is None:
                return None
            await event.wait()
            if conn.stream_events.get(sid) is event:  # as yamux's own read does
                conn.stream_events[sid] = trio.Event()
    except AttributeError as e:
        raise _internals_gone(e) from None


async def yamux_credit(stream: INetStream, min_credit: int) -> int:
    """Send one WINDOW_UPDATE for the bytes consumed and not yet credited once they reach
    ``min_credit``; returns the increment sent (0: none)."""
    ys = _yamux_of(stream)
    if ys is None:
        return 0
    try:
        conn, sid = ys.conn, ys.stream_id
        buf = conn.stream_buffers.get(sid)
        owed = ys.target_recv_window - (ys.recv_window + (len(buf) if buf else 0))
        if owed < max(1, min_credit) or ys.closed or ys.reset_received or buf is None:
            return 0
        ys.recv_window += owed
    except AttributeError as e:
        raise _internals_gone(e) from None
    await _yamux_send(conn, _YAMUX_FRAME.pack(0, _YAMUX_WINDOW_UPDATE, 0, sid, owed))
    return owed

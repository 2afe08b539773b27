"""libp2p host construction and the node's persistent Ed25519 identity.

One place builds every libp2p host in the project (volunteer daemons, trainer-side client
nodes, NAT lab nodes) so the transport stack is the same everywhere and set explicitly:

- TCP only (QUIC in py-libp2p 0.8.1 runs at ~2 MB/s),
- Noise as the only security transport (the library default also offers secio, TLS and
  *plaintext*; a peer must not be able to downgrade us to plaintext),
- yamux as the only stream muxer (mplex is ~10x slower).

Identity: ``load_or_create_identity(home)`` keeps the 32-byte Ed25519 seed in
``<home>/identity.key`` with owner-only permissions (0600, created atomically with
``O_EXCL`` so the key is never world-readable, not even for an instant). The peer id is
derived from it, so a node keeps its peer id across restarts.

Usage (inside trio)::

    key = load_or_create_identity(home)
    host = build_host(key, announce_addrs=["/ip4/203.0.113.5/tcp/4001"])
    async with run_host(host, ["/ip4/0.0.0.0/tcp/4001"]):
        print(full_multiaddrs(host))

``quiet_libp2p_logging()`` silences py-libp2p's noisy loggers (the KadDHT logger has its
own handler and does not propagate).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INotifee
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from volunteer.net import libp2p_adapter as lp
from volunteer.net.listen_error import listen_error, port_holder_error, shared_port_error

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.key"
LOG_ENV = "VOLUNTEER_LIBP2P_LOG"
_SEED_BYTES = 32
DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/0",)
LISTEN_HOST_ENV = "VOLUNTEER_LISTEN_HOST"


def default_listen_host() -> str:
    """``$VOLUNTEER_LISTEN_HOST`` (e.g. 127.0.0.1 for a swarm on one machine), else 0.0.0.0."""
    return os.environ.get(LISTEN_HOST_ENV, "").strip() or "0.0.0.0"


class IdentityError(Exception):
    """The identity file exists but is unreadable, malformed or too permissive."""


def load_or_create_identity(home: Path) -> KeyPair:
    """Load the Ed25519 identity from ``home/identity.key``, creating it (0600) if absent.

    Raises IdentityError when the file is malformed or readable by group/others (the
    message names the file and the fix).
    """
    home = Path(home)
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = home / IDENTITY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _load_identity(path)
    key = Ed25519PrivateKey.new()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key.to_bytes())
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return KeyPair(key, key.get_public_key())


def _load_identity(path: Path) -> KeyPair:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise IdentityError(
            f"identity file {path} has permissions {oct(mode)}; it must be readable by its "
            f"owner only: run `chmod 600 {path}`"
        )
    with open(path, "rb") as f:
        seed = f.read(_SEED_BYTES + 1)
    if len(seed) != _SEED_BYTES:
        raise IdentityError(
            f"identity file {path} is malformed ({len(seed)} bytes, expected {_SEED_BYTES}); "
            "move it away to create a new identity (the node gets a new peer id)"
        )
    key = Ed25519PrivateKey.from_bytes(seed)
    return KeyPair(key, key.get_public_key())


def peer_id_of(key_pair: KeyPair) -> ID:
    """The libp2p peer id of a key pair."""
    return ID.from_pubkey(key_pair.public_key)


def security_options(key_pair: KeyPair) -> dict[TProtocol, Any]:
    """Noise only (no secio/TLS/plaintext fallback)."""
    noise_key = create_new_x25519_key_pair()
    return {
        TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(key_pair, noise_privkey=noise_key.private_key)
    }


def muxer_options() -> dict[TProtocol, Any]:
    """yamux only (no mplex fallback)."""
    return {TProtocol(YAMUX_PROTOCOL_ID): Yamux}


def build_host(
    key_pair: KeyPair,
    *,
    announce_addrs: Sequence[str] | None = None,
    **extra: Any,
) -> IHost:
    """Build (not start) a TCP + Noise + yamux host for ``key_pair``.

    ``announce_addrs`` (multiaddr strings without /p2p) replace the listen addresses that
    the host advertises (e.g. a public address behind port forwarding). ``extra`` goes to
    ``libp2p.new_host`` unchanged (e.g. ``resource_manager`` or ``connection_config``)
    for callers that need more, such as the NAT lab.
    """
    announce = [multiaddr.Multiaddr(a) for a in announce_addrs] if announce_addrs else None
    host = new_host(
        key_pair=key_pair,
        sec_opt=security_options(key_pair),
        muxer_opt=muxer_options(),
        enable_quic=False,
        enable_tcp=True,
        enable_mDNS=False,
        enable_upnp=False,
        announce_addrs=announce,
        **extra,
    )
    tracker = ConnectionTracker()
    host.get_network().register_notifee(tracker)
    host._volunteer_tracker = tracker  # type: ignore[attr-defined]
    return host


def tcp_listen_targets(addrs: Sequence[multiaddr.Multiaddr]) -> list[tuple[str, int]]:
    """(ip, port) of each ``/ip4|ip6/A/tcp/P`` listen address (port 0: any free port)."""
    out = []
    for addr in addrs:
        parts = {p.name: addr.value_for_protocol(p.code) for p in addr.protocols()}
        ip = parts.get("ip4") or parts.get("ip6")
        if ip and parts.get("tcp") is not None:
            out.append((str(ip), int(parts["tcp"])))
    return out


@asynccontextmanager
async def run_host(host: IHost, listen_addrs: Sequence[str] = DEFAULT_LISTEN) -> AsyncIterator[IHost]:
    """Listen on ``listen_addrs`` for the duration of the block; close the host after. The
    node connects on demand: py-libp2p's auto-connector is stopped (``stop_auto_connector``).

    Raises ``ListenError`` (``volunteer.net.listen_error``) when a fixed port is held by
    anyone, another libp2p listener included: py-libp2p's listener sets SO_REUSEPORT (DCUtR
    needs it), so without these checks a second daemon would share the port silently.
    """
    addrs = [multiaddr.Multiaddr(a) for a in listen_addrs]
    targets = tcp_listen_targets(addrs)
    for ip, port in targets:  # a port held by anyone, reuse-port listeners included
        if port and (err := port_holder_error(ip, port)) is not None:
            raise err
    async with host.run(addrs):
        try:
            if targets and not host.get_transport_addrs():  # py-libp2p only logs a failed listen
                raise listen_error(*targets[0])
            for ip, port in targets:  # bound meanwhile by another process (SO_REUSEPORT)
                if port and (err := shared_port_error(ip, port)) is not None:
                    raise err
            try:
                await lp.stop_auto_connector(host)
            except lp.Libp2pInternalsError as e:  # a newer py-libp2p: it just keeps meshing
                log.warning("%s", e)
            yield host
        finally:
            # Shielded: when the caller was cancelled, the listeners and connections must
            # still close (peers then see us leave at once instead of timing out).
            # py-libp2p 0.8.1's host.close() leaves established connections open, so
            # close every peer's connections first.
            with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                await close_all_connections(host)
                await host.close()


class ConnectionTracker(INotifee):
    """Remembers the host's connections so ``close_all_connections`` can really close them.

    py-libp2p 0.8.1 drops connections from its tables on shutdown without closing their
    sockets, so peers would see a node that left as still connected, forever.
    """

    def __init__(self) -> None:
        self.conns: set[Any] = set()

    async def connected(self, network: Any, conn: Any) -> None:
        self.conns.add(conn)

    async def disconnected(self, network: Any, conn: Any) -> None:
        self.conns.discard(conn)

    async def opened_stream(self, network: Any, stream: Any) -> None:
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        return None

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None


def _socket_of(conn: Any) -> Any:
    obj = conn
    for attr in ("muxed_conn", "secured_conn", "conn", "conn", "stream", "stream", "socket"):
        obj = getattr(obj, attr, None)
        if obj is None:
            return None
    return obj


async def close_all_connections(host: IHost) -> None:
    """Close every connection of ``host``, down to the TCP socket (errors ignored)."""
    network = host.get_network()
    tracker = getattr(host, "_volunteer_tracker", None)
    conns = set(tracker.conns) if tracker is not None else set()
    for peer_conns in list(network.connections.values()):
        conns.update(peer_conns if isinstance(peer_conns, list) else [peer_conns])
    for conn in conns:
        try:
            with trio.move_on_after(1.0):
                await conn.close()
        except Exception:
            pass
        sock = _socket_of(conn)
        if sock is not None:
            try:
                sock.close()
            except Exception:
                pass


def local_ipv4_addrs() -> list[str]:
    """This machine's IPv4 interface addresses, loopback last."""
    import psutil

    ips: list[str] = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and a.address not in ips:
                ips.append(a.address)
    return sorted(ips, key=lambda ip: ip.startswith("127."))


def expand_unspecified(addrs: Sequence[str]) -> list[str]:
    """Replace ``/ip4/0.0.0.0/...`` (listen on all interfaces) by one address per interface."""
    out: list[str] = []
    for a in addrs:
        if a.startswith("/ip4/0.0.0.0/"):
            rest = a[len("/ip4/0.0.0.0"):]
            out.extend(f"/ip4/{ip}{rest}" for ip in local_ipv4_addrs())
        else:
            out.append(a)
    return list(dict.fromkeys(out))


def full_multiaddrs(host: IHost) -> list[str]:
    """The host's advertised addresses with ``/p2p/<peer id>``: what others dial.

    Listening on 0.0.0.0 is advertised as each interface address (loopback last).
    """
    pid = host.get_id().to_base58()
    out = []
    for s in expand_unspecified([str(a) for a in host.get_addrs()]):
        out.append(s if "/p2p/" in s else f"{s}/p2p/{pid}")
    return out


def parse_peer_addr(addr: str) -> PeerInfo:
    """Parse ``/ip4/.../tcp/.../p2p/<id>`` into a PeerInfo; ValueError with the address if bad."""
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception as e:
        raise ValueError(f"bad peer multiaddr {addr!r} (expected /ip4/A/tcp/P/p2p/ID): {e}") from e


_NOISY_LOGGERS = (
    "libp2p",
    "libp2p.kad_dht",
    "kademlia-example",
    "libp2p.kad_dht.kad_dht",
    "libp2p.kad_dht.routing_table",
    "libp2p.kad_dht.peer_routing",
    "libp2p.kad_dht.value_store",
    "libp2p.kad_dht.provider_store",
    "multiaddr",
)


def quiet_libp2p_logging(level: int | None = None) -> None:
    """Raise py-libp2p's loggers to ``level`` (they are noisy; some have their own handler).

    Default: CRITICAL, or the level named by ``$VOLUNTEER_LIBP2P_LOG`` (e.g. DEBUG) when
    debugging the network. py-libp2p logs routine events at ERROR (a peer that left, a
    stream a trainer cannot answer, a failed multistream handshake) with multi-line
    dumps; this package reports those to its callers as typed errors instead.
    """
    if level is None:
        name = os.environ.get(LOG_ENV, "").strip().upper()
        level = logging.getLevelName(name) if name else logging.CRITICAL
        if not isinstance(level, int):
            level = logging.CRITICAL
    names = set(_NOISY_LOGGERS)
    names.update(n for n in logging.root.manager.loggerDict if n.startswith(("libp2p", "multiaddr")))
    for name in names:
        logging.getLogger(name).setLevel(level)

"""Circuit Relay v2: public nodes relay (with limits), private nodes reserve slots and dial.

Built on ``libp2p.relay.circuit_v2``. One ``RelayNode`` per host holds the three roles
py-libp2p splits apart:

- HOP (only when ``allow_hop``: the node is publicly reachable and willing): relays
  circuits for others, bounded by ``RelayLimits`` (reservations, concurrent circuits,
  per-circuit duration and bytes).
- STOP: accepts connections that arrive through a relay.
- CLIENT: reserves a slot on a relay (refreshed before it expires) and dials peers
  through relays.

A private node announces ``<relay multiaddr>/p2p-circuit/p2p/<own id>`` for each relay it
holds a reservation on; another peer dials that full address with ``dial_circuit``
(the swarm's own dialer skips ``/p2p-circuit`` addresses in py-libp2p 0.8.1).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
from libp2p.abc import IHost, INetConn
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelaySettings:
    """Limits a relay (HOP) node enforces. Circuits carry expert traffic when hole punching
    fails, so the per-circuit budget is generous (go-libp2p's 128 KiB/2 min defaults are
    for signalling only)."""

    max_reservations: int = 64
    max_circuits: int = 32
    circuit_duration_s: int = 3600
    circuit_bytes: int = 1 << 30
    reservation_ttl_s: int = 3600

    def limits(self) -> RelayLimits:
        return RelayLimits(
            duration=self.circuit_duration_s,
            data=self.circuit_bytes,
            max_circuit_conns=self.max_circuits,
            max_reservations=self.max_reservations,
            reservation_ttl=self.reservation_ttl_s,
        )


class RelayError(Exception):
    """A reservation or a relayed dial failed; the message names the relay/peer."""


class _CircuitKey:
    """A per-circuit-direction key for ``CircuitV2Protocol._active_relays``."""

    def __init__(self, peer_id: ID) -> None:
        self.peer_id = peer_id

    def __str__(self) -> str:
        return str(self.peer_id)


class _CircuitV2Protocol(CircuitV2Protocol):
    """CircuitV2Protocol with one fix: each circuit cleans up only its own streams.

    py-libp2p 0.8.1 files the streams of a circuit under the *peer id* in
    ``_active_relays`` and, when a relaying direction ends, closes whatever is filed
    under that peer id: the streams of the *latest* circuit of that peer. So when a
    trainer held circuits to two volunteers through one relay (or two trainers to one
    volunteer), ending one circuit cut the other. Here each direction registers its own
    streams under a unique key. (The per-reservation byte tracking keyed by peer id is
    only the fallback for circuits without a data limit, i.e. unlimited ones.)
    """

    async def _relay_data(self, src_stream, dst_stream, peer_id, deadline=None,  # type: ignore[override]
                          circuit_data_limit=None) -> None:
        key = _CircuitKey(peer_id)
        self._active_relays[key] = (src_stream, dst_stream)  # type: ignore[index]
        await super()._relay_data(src_stream, dst_stream, key, deadline, circuit_data_limit)  # type: ignore[arg-type]


def circuit_addr(relay_addr: str, peer_id: ID | str) -> str:
    """``/ip4/R/tcp/P/p2p/<relay>`` + ``/p2p-circuit/p2p/<peer>``."""
    pid = peer_id.to_base58() if isinstance(peer_id, ID) else str(peer_id)
    if "/p2p/" not in relay_addr:
        raise ValueError(f"relay address {relay_addr!r} lacks /p2p/<relay peer id>")
    return f"{relay_addr.rstrip('/')}/p2p-circuit/p2p/{pid}"


def is_circuit_addr(addr: str) -> bool:
    return "/p2p-circuit" in addr


class RelayNode:
    """STOP + CLIENT roles, plus HOP when ``allow_hop``; run it with ``running()``."""

    def __init__(self, host: IHost, allow_hop: bool, settings: RelaySettings | None = None) -> None:
        self.host = host
        self.allow_hop = allow_hop
        self.settings = settings or RelaySettings()
        limits = self.settings.limits()
        self.protocol = _CircuitV2Protocol(host, limits=limits, allow_hop=allow_hop)
        roles = RelayRole.STOP | RelayRole.CLIENT
        if allow_hop:
            roles |= RelayRole.HOP
        self.transport = CircuitV2Transport(host, self.protocol, RelayConfig(roles=roles, limits=limits))
        self._nursery: trio.Nursery | None = None
        self.reserved: dict[str, str] = {}  # relay peer id -> relay multiaddr we reserved on

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RelayNode]:
        """Run the relay protocol service (and the reservation refresher) for the block."""
        async with background_trio_service(self.protocol), trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield self
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    async def reserve(self, relay_addr: str, timeout: float = 20.0) -> str:
        """Reserve a slot on the relay at ``relay_addr`` (``/ip4/R/tcp/P/p2p/<relay>``).

        Returns our circuit address through it. Raises RelayError on failure (relay
        unreachable, not a relay, or refusing: e.g. its reservation limit is reached).
        """
        if self._nursery is None:
            raise RuntimeError("RelayNode.reserve needs running()")
        try:
            info = info_from_p2p_addr(Multiaddr(relay_addr))
        except Exception as e:
            raise RelayError(f"bad relay address {relay_addr!r}: {e}") from e
        try:
            with trio.fail_after(timeout):
                await self.host.connect(info)
                stream = await self.host.new_stream(info.peer_id, [HOP_PROTOCOL])
                try:
                    ok = await self.transport.reserve(stream, info.peer_id, self._nursery)
                finally:
                    await stream.close()
        except trio.TooSlowError:
            raise RelayError(f"relay {relay_addr} did not answer within {timeout:.0f}s") from None
        except RelayError:
            raise
        except Exception as e:
            raise RelayError(f"cannot reserve a slot on relay {relay_addr}: {e}") from e
        if not ok:
            raise RelayError(f"relay {relay_addr} refused the reservation (not a relay, or full)")
        self.reserved[info.peer_id.to_base58()] = relay_addr
        return circuit_addr(relay_addr, self.host.get_id())

    def relay_addrs(self) -> list[str]:
        """Our circuit addresses on relays whose reservation is unexpired and whose
        connection is still open (a relay that restarted forgot our reservation)."""
        network = self.host.get_network()
        me = self.host.get_id()
        out = []
        for pid in list(self.transport._reservations):
            addr = self.reserved.get(pid.to_base58())
            if addr and any(not c.is_closed for c in network.get_connections(pid)):
                out.append(circuit_addr(addr, me))
        return out

    async def dial_circuit(self, addr: str, timeout: float = 20.0) -> INetConn:
        """Connect to a peer through the relay named in ``addr`` (a full circuit address).

        The connection joins the swarm (new streams to that peer use it) and is marked
        RELAYED, so DCUtR sees it and tries to upgrade it to a direct one.
        """
        maddr = Multiaddr(addr)
        try:
            _relay_ma, dest = self.transport.parse_circuit_ma(maddr)
        except ValueError as e:
            raise RelayError(str(e)) from e
        self.host.get_peerstore().add_addrs(dest, [maddr], 3600)
        try:
            with trio.fail_after(timeout):
                relay_info = info_from_p2p_addr(_relay_ma)
                await self.host.connect(relay_info)
                return await self.transport.dial(maddr)
        except trio.TooSlowError:
            raise RelayError(f"relayed dial to {addr} timed out after {timeout:.0f}s") from None
        except Exception as e:
            raise RelayError(f"relayed dial to {addr} failed: {e}") from e


def peer_info(addr: str) -> PeerInfo:
    return info_from_p2p_addr(Multiaddr(addr))

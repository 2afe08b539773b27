"""DCUtR hole punching: upgrade relayed connections to direct ones.

Wraps py-libp2p's ``DCUtRProtocol`` (``/libp2p/dcutr``): when two NATed peers talk through
a relay, they exchange their observed public addresses over the relayed connection and
dial each other at the same moment from their listen ports (TCP simultaneous open), so
each NAT sees an outbound flow before the peer's packets arrive. The protocol's own loop
drives a punch toward every relayed peer every few seconds; ``upgrade`` asks for one now.

Which connections were hole-punched is recorded by a ``ConnectionLedger`` registered as a
network notifee: a direct connection that opens while a DCUtR session with its peer is in
progress is labelled ``hole_punched``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.tools.anyio_service import background_trio_service

from volunteer.net.nat.connections import HOLE_PUNCHED, ConnectionLedger, is_relayed


class HolePuncher:
    """DCUtR service + the ledger of hole-punched connections; run with ``running()``."""

    def __init__(self, host: IHost, dial_timeout: int = 3) -> None:
        self.host = host
        self.dcutr = DCUtRProtocol(host, dial_timeout=dial_timeout)
        self.ledger = ConnectionLedger(punching=lambda pid: pid in self.dcutr._in_progress)
        self.first_punch_at: float | None = None  # monotonic time of the first success
        self.attempts = 0
        self.successes = 0

    @asynccontextmanager
    async def running(self) -> AsyncIterator[HolePuncher]:
        network = self.host.get_network()
        network.register_notifee(self.ledger)
        try:
            async with background_trio_service(self.dcutr):
                yield self
        finally:
            with contextlib.suppress(Exception):
                network.remove_notifee(self.ledger)

    def direct_connection(self, peer_id: ID) -> str | None:
        """The kind (``direct`` / ``hole_punched``) of our best non-relayed connection to
        ``peer_id``, or None when every connection to it is relayed (or there is none)."""
        conns = self.host.get_network().get_connections(peer_id)
        kinds = [self.ledger.kind(c) for c in conns if not is_relayed(c) and not c.is_closed]
        if not kinds:
            return None
        return HOLE_PUNCHED if HOLE_PUNCHED in kinds else kinds[0]

    async def upgrade(self, peer_id: ID, timeout: float = 30.0) -> str | None:
        """Try to get a direct connection to ``peer_id`` (connected through a relay).

        Initiates DCUtR at once and keeps trying (the peer may initiate too) until a
        direct connection exists or ``timeout`` passes. Returns the connection kind
        (``hole_punched`` / ``direct``) or None when the punch failed.
        """
        deadline = trio.current_time() + timeout
        while trio.current_time() < deadline:
            kind = self.direct_connection(peer_id)
            if kind is not None:
                return kind
            self.attempts += 1
            with trio.move_on_after(max(0.1, deadline - trio.current_time())):
                ok = await self.dcutr.initiate_hole_punch(peer_id)
                if ok:
                    self.successes += 1
                    if self.first_punch_at is None:
                        self.first_punch_at = time.monotonic()
            kind = self.direct_connection(peer_id)
            if kind is not None:
                return kind
            # Initiation budget spent or the peer is mid-session: give it a moment.
            await trio.sleep(min(0.5, max(0.0, deadline - trio.current_time())))
            self.dcutr._hole_punch_attempts.pop(peer_id, None)
        return self.direct_connection(peer_id)

    def snapshot(self) -> dict:
        return {
            "attempts": self.attempts,
            "hole_punched_total": self.ledger.hole_punches,
        }

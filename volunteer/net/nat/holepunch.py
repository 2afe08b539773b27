"""DCUtR hole punching: upgrade relayed connections to direct ones.

Wraps py-libp2p's ``DCUtRProtocol`` (``/libp2p/dcutr``): when two NATed peers talk through
a relay, they exchange their observed public addresses over the relayed connection and
dial each other at the same moment from their listen ports (TCP simultaneous open), so
each NAT sees an outbound flow before the peer's packets arrive. The protocol's own loop
drives a punch toward every relayed peer every few seconds; ``upgrade`` asks for one now.

Which connections were hole-punched is recorded by a ``ConnectionLedger`` registered as a
network notifee: a direct connection that opens while a DCUtR session with its peer is in
progress, or less than ``PUNCH_AFTERGLOW_S`` after one ended, is labelled ``hole_punched``.
The afterglow matters: the two peers' sessions do not end together, and a punch often lands
through the *other* side's retransmitted SYN after our own session gave up (its round or
``upgrade``'s deadline ran out) while our NAT still holds the mapping our SYN opened; that
connection is no less hole-punched. (Labelling only during our own session called it
``direct`` now and then: the NAT-lab flake of issue 10.) Between two NATed peers nothing
else makes a direct connection, so the window only has to cover the SYN retries.

py-libp2p's DCUtR gives up on a peer after ``MAX_HOLE_PUNCH_ATTEMPTS`` (3) sessions until
that peer disconnects, and on a busy machine all three can be mistimed. ``running()`` also
runs a slow retry loop: every ``RETRY_INTERVAL_S`` a peer that is still reached only
through a relay gets its attempt budget back, so the protocol's own loop tries again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.tools.anyio_service import background_trio_service

from volunteer.net.nat.connections import HOLE_PUNCHED, ConnectionLedger, is_relayed

PUNCH_AFTERGLOW_S = 30.0  # > the SYN retries (1 s, 3 s, 7 s, 15 s) of the peer's last dial
RETRY_INTERVAL_S = 15.0
MAX_REMEMBERED_SESSIONS = 4096


class SessionSet(set):
    """DCUtR's set of peers with a session in progress (``DCUtRProtocol._in_progress``),
    remembering when the last session with each peer ended (bounded, oldest forgotten)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self.ended: dict[Any, float] = {}
        self.late = 0  # times ``punching`` said yes only thanks to the afterglow

    def _end(self, item: Any) -> None:
        if item in self:
            self.ended.pop(item, None)
            self.ended[item] = self.clock()
            while len(self.ended) > MAX_REMEMBERED_SESSIONS:
                self.ended.pop(next(iter(self.ended)))

    def discard(self, item: Any) -> None:
        self._end(item)
        super().discard(item)

    def remove(self, item: Any) -> None:
        self._end(item)
        super().remove(item)

    def clear(self) -> None:
        for item in list(self):
            self._end(item)
        super().clear()

    def punching(self, item: Any, afterglow: float = PUNCH_AFTERGLOW_S) -> bool:
        """A session with ``item`` is under way, or one ended less than ``afterglow`` s ago."""
        if item in self:
            return True
        ended = self.ended.get(item)
        if ended is not None and self.clock() - ended < afterglow:
            self.late += 1
            return True
        return False


class HolePuncher:
    """DCUtR service + the ledger of hole-punched connections; run with ``running()``."""

    def __init__(self, host: IHost, dial_timeout: int = 3,
                 retry_interval: float = RETRY_INTERVAL_S) -> None:
        self.host = host
        self.dcutr = DCUtRProtocol(host, dial_timeout=dial_timeout)
        # The one reach into the protocol's state: its set of peers being punched (a plain
        # set in py-libp2p 0.8.1, only added to, discarded from, tested and cleared).
        if not isinstance(self.dcutr._in_progress, set):
            raise RuntimeError("py-libp2p's DCUtRProtocol._in_progress is no longer a set")
        self.sessions = SessionSet()
        self.dcutr._in_progress = self.sessions
        self.ledger = ConnectionLedger(punching=self.sessions.punching)
        self.retry_interval = retry_interval
        self.first_punch_at: float | None = None  # monotonic time of the first success
        self.attempts = 0
        self.successes = 0
        self.retries = 0  # attempt budgets given back to peers still only relayed

    @asynccontextmanager
    async def running(self) -> AsyncIterator[HolePuncher]:
        network = self.host.get_network()
        network.register_notifee(self.ledger)
        try:
            async with background_trio_service(self.dcutr), trio.open_nursery() as nursery:
                nursery.start_soon(self._retry_loop)
                try:
                    yield self
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with contextlib.suppress(Exception):
                network.remove_notifee(self.ledger)

    def relayed_only(self) -> list[ID]:
        """Peers with an open relayed connection and no direct one."""
        out = []
        for pid, conns in list(self.host.get_network().connections.items()):
            items = conns if isinstance(conns, list) else [conns]
            open_conns = [c for c in items if not c.is_closed]
            if open_conns and all(is_relayed(c) for c in open_conns):
                out.append(pid)
        return out

    async def _retry_loop(self) -> None:
        """Give peers that are still only relayed their attempt budget back, now and then."""
        while True:
            await trio.sleep(self.retry_interval)
            for pid in self.relayed_only():
                if self.dcutr._hole_punch_attempts.pop(pid, None) is not None:
                    self.retries += 1

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
            "retries": self.retries,
            "late": self.sessions.late,
            "hole_punched_total": self.ledger.hole_punches,
        }

"""``ProtocolChannel``: one more request/reply protocol on a node's libp2p host, both ways.

A node that already runs the expert-RPC and shard protocols may carry other messages between
peers (the averaging of replicas and trainers, ``/volunteer/averaging/1.0.0``) on the same
host and connections. This module does it without knowing what the messages mean (``net``
never imports ``client``): frames in, frames out.

- **Inbound**: an ``RpcServer`` with this protocol id (so every bound of the expert RPC holds:
  frame lengths checked against ``limits`` before anything is read, one ``ByteBudget`` of
  ``max_inflight_bytes`` for all peers, ``PeerLimits`` per peer, read/write deadlines,
  large messages decoded off the event loop). Each admitted message goes to
  ``submit(peer_id, frames, reply)`` with the *authenticated* peer id of the connection
  (base58), never a name taken from the message. Until ``serve`` installs a submit, messages
  are answered ``overloaded`` ("try later"), as the averaging contract asks.
- **Outbound**: ``request(peer, addrs, frames, timeout)`` from any thread but the loop's
  (``RpcClient.call_from_thread``: one hand-off into the loop per call): an
  ``RpcClient`` with this protocol id (pooled, multiplexed streams; direct, hole-punched or
  relayed connections through the node's connector), replies bounded by ``reply_limits``.
  It returns the reply frames or raises ``RemoteTimeoutError`` / ``UnreachableError``; a
  bad peer id or a stopped loop is ``UnreachableError`` too.

``ProtocolChannel`` has the shape of ``volunteer.client.averaging.group.PeerChannel``
(``request`` / ``serve``), so the daemon hands it to the averaging code as it is. It is built
in the node's trio thread (``NetworkService.open_channel`` does that) and lives as long as
the node's nursery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from volunteer.net.peer_limits import PeerLimits
from volunteer.net.rpc_client import Connector, RpcClient
from volunteer.net.rpc_server import RpcServer
from volunteer.net.trio_thread import TrioThread
from volunteer.wire.errors import InternalError, OverloadedError, UnreachableError
from volunteer.wire.limits import WireLimits
from volunteer.wire.messages import encode_error

log = logging.getLogger(__name__)

Reply = Callable[[list], None]
# submit(peer_id_base58, frames, reply): answer by calling reply(frames) once, from any thread
PeerSubmit = Callable[[str, list, Reply], None]

CHANNEL_PEER_LIMITS = PeerLimits(requests_per_s=20.0, burst=40, max_concurrent=4,
                                 idle_timeout_s=300.0, read_timeout_s=30.0,
                                 min_read_rate=256 * 1024)
"""Per peer, for infrequent bulk messages (averaging: one exchange per group every few
seconds at most): 20 requests/s, 4 at a time; a message body must arrive at >= 256 KiB/s
(30 s + size / rate), so a relayed path can carry tens of MiB."""
CHANNEL_INFLIGHT_BYTES = 256 * 2**20
MAX_STREAMS_PER_PEER = 2


@dataclass(frozen=True)
class ChannelLimits:
    """What a channel accepts and holds: message bounds in (``limits``) and out
    (``reply_limits``), bytes held in flight for all peers, and per-peer bounds."""

    limits: WireLimits
    reply_limits: WireLimits
    max_inflight_bytes: int = CHANNEL_INFLIGHT_BYTES
    peer_limits: PeerLimits = CHANNEL_PEER_LIMITS
    connect_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.max_inflight_bytes < 1 or not self.connect_timeout > 0:
            raise ValueError("ChannelLimits: max_inflight_bytes must be >= 1 and connect_timeout > 0")


class _PeerRpcServer(RpcServer):
    """``RpcServer`` that hands the authenticated peer id along with each message.

    ``RpcServer`` admits a message against its peer's limits (``_admit`` records the peer on
    the message's ticket) before it calls ``_dispatch``; this subclass reads that peer id
    there and calls ``channel.dispatch(peer, frames, reply)`` (the test of this module checks
    the id that arrives)."""

    def __init__(self, host: IHost, channel: ProtocolChannel, protocol: str,
                 limits: ChannelLimits) -> None:
        super().__init__(host, self._no_peer, limits.limits, protocol=protocol,
                         max_inflight_bytes=limits.max_inflight_bytes,
                         peer_limits=limits.peer_limits)
        self.channel = channel

    @staticmethod
    def _no_peer(frames: list, reply: Reply) -> None:  # never used: _dispatch routes
        reply(encode_error(None, "internal", "no peer id"))

    def _dispatch(self, frames: list, reply: Reply, ticket: Any) -> None:
        """Hand the message to the channel with the ticket's peer id (``RpcServer`` replies
        at most once and answers ``internal`` if this raises)."""
        peer = ticket.peer
        if not isinstance(peer, ID):
            reply(encode_error(None, "bad_request", "unknown peer: the connection has no peer id"))
            return
        self.channel.dispatch(peer.to_base58(), frames, reply)


class ProtocolChannel:
    """Serve and call one protocol on a host (see module docstring)."""

    def __init__(self, thread: TrioThread, host: IHost, nursery: trio.Nursery, protocol: str,
                 limits: ChannelLimits, connector: Connector | None = None) -> None:
        """Build in ``thread``'s loop (the host, nursery and RPC state belong to it)."""
        thread.check_owner("a protocol channel")
        self.protocol = protocol
        self.limits = limits
        self._thread = thread
        self._submit: PeerSubmit | None = None
        self.refused_unserved = 0
        self.client = RpcClient(host, nursery, limits.reply_limits, max_streams=MAX_STREAMS_PER_PEER,
                                connect_timeout=limits.connect_timeout, connector=connector,
                                protocol=protocol)
        self.server = _PeerRpcServer(host, self, protocol, limits)
        self.server.install()

    # ------------------------------------------------------------------ PeerChannel
    def serve(self, submit: PeerSubmit | None) -> None:
        """Hand every inbound message to ``submit`` from now on (None: answer ``overloaded``).
        ``submit`` runs in the loop or a worker thread and must not block."""
        self._submit = submit

    def request(self, peer: str, addrs: Sequence[str], frames: list, timeout: float) -> list[bytes]:
        """Send ``frames`` to ``peer`` and return its reply frames within ``timeout`` s
        (``RemoteTimeoutError`` / ``UnreachableError`` otherwise). Not from the loop thread."""
        try:
            pid = ID.from_base58(peer)
        except Exception:
            raise UnreachableError(f"not a peer id: {str(peer)[:60]!r}") from None
        # one hand-off into the loop per call (``RpcClient.call_from_thread``); a stopped
        # loop is ``UnreachableError``
        return self.client.call_from_thread(self._thread, pid, list(addrs)[:16], list(frames),
                                            float(timeout))

    # ------------------------------------------------------------------ inbound
    def dispatch(self, peer: str, frames: list, reply: Reply) -> None:
        """One admitted inbound message (called by the server, in the loop or a worker)."""
        submit = self._submit
        if submit is None:
            self.refused_unserved += 1
            err = OverloadedError(f"{self.protocol} is not served here yet; try later")
            reply(encode_error(None, err.code, err.message))
            return
        try:
            submit(peer, frames, reply)
        except Exception as e:  # a handler bug must still answer, once
            log.warning("%s handler raised: %r", self.protocol, e)
            err = InternalError(f"handler failed: {type(e).__name__}")
            reply(encode_error(None, err.code, err.message))

    def snapshot(self) -> dict:
        """Counters of both sides (plain data; read in the loop or after it stopped)."""
        c = self.client.stats
        return {"protocol": self.protocol, "server": self.server.stats.as_dict(),
                "refused_unserved": self.refused_unserved,
                "client": {"calls": c.calls, "timeouts": c.timeouts, "unreachable": c.unreachable,
                           "streams_opened": c.streams_opened}}

    async def close(self) -> None:
        """Stop answering (``overloaded``) and reset the outbound streams."""
        self._submit = None
        await self.client.close()

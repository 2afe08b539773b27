"""``install_dht_guard``: per-peer limits in front of py-libp2p's inbound Kademlia handler.

py-libp2p 0.8.1's ``KadDHT.handle_stream`` serves at most 12 inbound KAD streams at once for
*all* peers together, reads each stream's messages in a loop without any deadline and
accepts messages of up to 4 MiB. So one peer that opens 12 streams and sends nothing
starves every other peer, and one that sends fast gets all the handler's CPU. The guard
wraps that handler (it does not change py-libp2p):

- **Streams per peer**: a new stream takes a token and a slot of the peer's
  ``PeerLimits`` (``DHT_PEER_LIMITS``: ``max_concurrent`` open KAD streams per peer); beyond
  them it is reset at once, before py-libp2p sees it.
- **Messages per peer**: every message takes a token from the same bucket
  (``requests_per_s``, ``burst``); a peer over its rate has its stream reset before the
  message is read.
- **Size**: a message whose varint length exceeds ``max_message_bytes`` (by default the
  largest registry value, ``records.MAX_VALUE_BYTES``, plus protobuf overhead) is refused
  before its body is read.
- **Time**: the next message must start within ``idle_timeout_s`` (an idle stream is then
  closed, freeing its slot) and arrive whole within ``read_deadline_s(length)``.

Refusals are a stream reset (Kademlia's answer to any error; ``DhtSessions`` callers see a
typed ``DhtRequestError``), counted in ``DhtGuard.stats``. The wrapper hands py-libp2p a
stream whose ``read`` ends the stream (returns ``b""``) when a limit says no; its ``close``
then resets. ``dht.handle_stream`` itself is replaced on the instance, so
``KadDHT.switch_mode`` (which re-registers ``self.handle_stream``) keeps the guard.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT

from volunteer.net.peer_limits import DHT_PEER_LIMITS, PeerLimiter, PeerLimits
from volunteer.net.records import MAX_VALUE_BYTES
from volunteer.net.stream_io import reset_quietly

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = MAX_VALUE_BYTES + 16 * 1024  # one record + key, signature, peer info


@dataclass
class DhtGuardStats:
    streams: int = 0
    streams_refused: int = 0
    messages: int = 0
    rate_limited: int = 0
    too_large: int = 0
    timeouts: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class DhtGuard:
    """The guarded stream handler (see module docstring)."""

    def __init__(self, inner: Any, limits: PeerLimits = DHT_PEER_LIMITS,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.inner = inner  # the DHT's own handle_stream
        self.limits = limits
        self.max_message_bytes = max_message_bytes
        self.peers = PeerLimiter(limits)
        self.stats = DhtGuardStats()

    async def handle_stream(self, stream: INetStream) -> None:
        self.stats.streams += 1
        try:
            peer = stream.muxed_conn.peer_id
        except Exception:
            peer = None
        if self.peers.try_enter(peer) is not None:
            self.stats.streams_refused += 1
            await reset_quietly(stream)
            return
        guarded = _GuardedStream(stream, self, peer)
        try:
            await self.inner(guarded)
        finally:
            self.peers.leave(peer)
            if guarded.refused:
                await reset_quietly(stream)


class _GuardedStream:
    """The stream py-libp2p's handler reads: message boundaries tracked from the varint
    prefixes, a token per message, a size bound and deadlines on every read."""

    def __init__(self, stream: INetStream, guard: DhtGuard, peer: Any) -> None:
        self._stream = stream
        self._guard = guard
        self._peer = peer
        self._prefix = bytearray()  # varint bytes of the message being started
        self._remaining = 0  # body bytes of the current message still to come
        self._deadline = 0.0
        self.refused = False

    def __getattr__(self, name: str) -> Any:  # muxed_conn, write, metric channel, ...
        return getattr(self._stream, name)

    async def read(self, n: int | None = None) -> bytes:
        if self.refused:
            return b""
        guard = self._guard
        if self._remaining == 0 and not self._prefix:  # a new message starts here
            timeout = guard.limits.idle_timeout_s
            with trio.move_on_after(timeout) as idle:
                first = await self._stream.read(1)
            if idle.cancelled_caught or not first:
                return b""  # idle or EOF: py-libp2p closes the stream cleanly
            if not guard.peers.take_token(self._peer):
                guard.stats.rate_limited += 1
                return self._refuse()
            guard.stats.messages += 1
            self._deadline = trio.current_time() + guard.limits.read_timeout_s
            return self._on_prefix_byte(first)
        with trio.move_on_at(self._deadline) as late:
            if self._remaining == 0:  # still in the varint prefix: py-libp2p reads 1 byte
                data = await self._stream.read(1)
            else:
                want = self._remaining if n is None or n < 0 else min(n, self._remaining)
                data = await self._stream.read(want)
        if late.cancelled_caught:
            guard.stats.timeouts += 1
            return self._refuse()
        if self._remaining == 0:
            return self._on_prefix_byte(data) if data else data
        self._remaining -= len(data)
        return data

    def _on_prefix_byte(self, data: bytes) -> bytes:
        self._prefix += data
        if data[0] & 0x80:
            if len(self._prefix) >= 10:  # longer than any 64-bit varint
                return self._refuse()
            return data
        length = 0
        for i, b in enumerate(self._prefix):
            length |= (b & 0x7F) << (7 * i)
        self._prefix.clear()
        guard = self._guard
        if length > guard.max_message_bytes:
            guard.stats.too_large += 1
            return self._refuse()
        self._remaining = length
        self._deadline = trio.current_time() + guard.limits.read_deadline_s(length)
        return data

    def _refuse(self) -> bytes:
        """End the stream for py-libp2p (it sees EOF); the guard resets it afterwards."""
        self.refused = True
        return b""

    async def close(self) -> None:
        if self.refused:
            await reset_quietly(self._stream)
        else:
            await self._stream.close()



def install_dht_guard(host: IHost, dht: KadDHT, limits: PeerLimits = DHT_PEER_LIMITS,
                      max_message_bytes: int = MAX_MESSAGE_BYTES) -> DhtGuard:
    """Put a ``DhtGuard`` in front of ``dht``'s inbound KAD handler (call right after
    ``make_dht``); idempotent. Returns the guard (its ``stats`` for status reports)."""
    existing = getattr(dht, "_volunteer_dht_guard", None)
    if existing is not None:
        return existing
    guard = DhtGuard(dht.handle_stream, limits, max_message_bytes)
    dht.handle_stream = guard.handle_stream  # type: ignore[method-assign]
    dht._volunteer_dht_guard = guard  # type: ignore[attr-defined]
    if dht.mode == DHTMode.SERVER:
        host.set_stream_handler(KAD_PROTOCOL_ID, guard.handle_stream)
    return guard

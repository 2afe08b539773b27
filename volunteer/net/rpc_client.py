"""Expert RPC client over libp2p streams: ``RpcClient`` (trio) and ``Libp2pTransport`` (sync).

``RpcClient`` (one per protocol: expert RPC by default, ``protocol=`` e.g. the shard
protocol) keeps, per peer, a small pool of long-lived streams (``max_streams``, default
2). Each stream carries many requests at once: a request gets a call id, is written under
the stream's write lock, and a reader task hands each reply to the waiting caller by call
id (replies may come back in any order). A call picks the stream with the fewest requests
in flight and opens another one while every stream is busy and the pool is not full.
Reusing streams matters: a new stream costs a multistream negotiation round trip, a new
connection >= 250 ms.

A stream opened on a relayed connection is retired as soon as a direct connection to that
peer exists (a hole punch that landed after the first calls): new calls open streams on
the direct connection (the swarm prefers direct connections), and the relayed stream is
closed once its calls in flight have their replies.

Failures are typed: no connection or the stream broke -> ``UnreachableError``, no reply in
time -> ``RemoteTimeoutError``; a timed-out caller leaves the stream usable (its late reply
is dropped), while an interrupted write resets that stream (its framing is lost).

What a server's replies can cost us is bounded by the reader itself, whatever the callers'
timeouts: a reply's frame lengths are checked against ``limits`` (``REPLY_LIMITS``) before
anything is allocated; once its call id arrived, its lengths must follow within
``reply_timeout_s`` and its body within ``reply_timeout_s + size / min_reply_rate`` (a
trickling server loses the stream, and its calls fail ``UnreachableError``); and a reply
whose caller is no longer waiting (timed out, or a call id never sent) is discarded in
bounded chunks, never buffered.

``Libp2pTransport(client_thread, rpc, peer_id, addrs)`` is the CONTRACT ``Transport``:
thread-safe ``request(frames, timeout)`` that runs the call in the node's trio thread.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from volunteer.net import libp2p_adapter as lp
from volunteer.net.stream_io import (
    PROTOCOL_ID,
    BufferedStreamReader,
    encode_message,
    read_call_id,
    read_lengths,
    reset_quietly,
)
from volunteer.net.trio_thread import TrioThread, TrioThreadError
from volunteer.wire.errors import RemoteError, RemoteTimeoutError, UnreachableError
from volunteer.wire.limits import WireLimits

log = logging.getLogger(__name__)

# Bounds on replies (from a server we chose; larger than request limits: backward replies
# carry one gradient per input).
REPLY_LIMITS = WireLimits(max_header_bytes=1 << 20, max_tensors=64, max_elements=2**31,
                          max_bytes=512 * 2**20)
REPLY_TIMEOUT_S = 30.0  # from a reply's call id to its frame lengths; base of the body's deadline
MIN_REPLY_RATE = 256 * 1024  # bytes/s a server must sustain while a reply body is read

Frame = bytes | memoryview
# connector(peer_id, addrs): make sure a connection to the peer exists (raise if it cannot)
Connector = Callable[[ID, list[str]], Awaitable[None]]


@dataclass
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    frames: list[bytes] | None = None
    error: RemoteError | None = None


class _Channel:
    """One stream with its in-flight calls."""

    def __init__(self, stream: INetStream, relayed: bool = False) -> None:
        self.stream = stream
        self.pending: dict[int, _Pending] = {}
        self.write_lock = trio.Lock()
        self.broken = False
        self.relayed = relayed
        self.retired = False

    def fail_all(self, why: str) -> None:
        self.broken = True
        for p in self.pending.values():
            if not p.done.is_set():
                p.error = UnreachableError(why)
                p.done.set()


@dataclass
class RpcClientStats:
    calls: int = 0
    streams_opened: int = 0
    timeouts: int = 0
    unreachable: int = 0
    streams_retired: int = 0
    replies_dropped: int = 0  # late or unknown replies, discarded unread
    reply_timeouts: int = 0  # streams reset because a reply came too slowly


class RpcClient:
    """Per-peer stream pools with call-id multiplexing (trio side; see module docstring)."""

    def __init__(self, host: IHost, nursery: trio.Nursery, limits: WireLimits = REPLY_LIMITS,
                 max_streams: int = 2, connect_timeout: float = 10.0,
                 connector: Connector | None = None, protocol: str = PROTOCOL_ID, *,
                 reply_timeout_s: float = REPLY_TIMEOUT_S,
                 min_reply_rate: int = MIN_REPLY_RATE) -> None:
        if not reply_timeout_s > 0 or min_reply_rate < 1:
            raise ValueError("RpcClient: reply_timeout_s must be > 0 and min_reply_rate >= 1")
        self.host = host
        self.protocol = protocol
        self.connector = connector
        self.nursery = nursery
        self.limits = limits
        self.max_streams = max_streams
        self.connect_timeout = connect_timeout
        self.reply_timeout_s = reply_timeout_s
        self.min_reply_rate = min_reply_rate
        self.stats = RpcClientStats()
        self._pools: dict[ID, list[_Channel]] = {}
        self._open_locks: dict[ID, trio.Lock] = {}
        self._ids = itertools.count(1)

    async def call(self, peer_id: ID, addrs: Sequence[str], frames: Sequence[Frame],
                   timeout: float) -> list[bytes]:
        """Send one request to ``peer_id``; return the reply frames."""
        self.stats.calls += 1
        call_id = next(self._ids)
        data = encode_message(call_id, frames)
        try:
            with trio.fail_after(timeout):
                chan = await self._pick(peer_id, addrs)
                slot = _Pending()
                chan.pending[call_id] = slot
                try:
                    await self._write(chan, data)
                    await slot.done.wait()
                finally:
                    chan.pending.pop(call_id, None)
                    if chan.retired and not chan.pending:
                        self.nursery.start_soon(reset_quietly, chan.stream)
        except trio.TooSlowError:
            self.stats.timeouts += 1
            raise RemoteTimeoutError(f"no reply from {peer_id} within {timeout:.1f} s") from None
        except UnreachableError:
            self.stats.unreachable += 1
            raise
        if slot.error is not None:
            self.stats.unreachable += 1
            raise slot.error
        return slot.frames  # type: ignore[return-value]

    async def _write(self, chan: _Channel, data: bytes) -> None:
        async with chan.write_lock:
            if chan.broken:
                raise UnreachableError("stream closed")
            ok = False
            try:
                await chan.stream.write(data)
                ok = True
            except Exception as e:
                raise UnreachableError(f"stream write failed: {type(e).__name__}") from None
            finally:
                if not ok:  # error or cancelled mid-write: the stream's framing is lost
                    chan.fail_all("stream reset after an interrupted write")
                    with trio.CancelScope(shield=True):
                        await reset_quietly(chan.stream)

    async def _pick(self, peer_id: ID, addrs: Sequence[str]) -> _Channel:
        pool = self._pools.setdefault(peer_id, [])
        pool[:] = [c for c in pool if not c.broken]
        if any(c.relayed for c in pool) and self._has_direct(peer_id):
            self._retire_relayed(pool)
        best = min(pool, key=lambda c: len(c.pending), default=None)
        if best is not None and (not best.pending or len(pool) >= self.max_streams):
            return best
        lock = self._open_locks.setdefault(peer_id, trio.Lock())
        async with lock:
            pool[:] = [c for c in pool if not c.broken]
            if len(pool) >= self.max_streams or (pool and any(not c.pending for c in pool)):
                return min(pool, key=lambda c: len(c.pending))
            stream = await self._open_stream(peer_id, addrs)
            chan = _Channel(stream, relayed=self._on_relayed_connection(peer_id, stream))
            pool.append(chan)
            self.stats.streams_opened += 1
            self.nursery.start_soon(self._read_replies, peer_id, chan)
            return chan

    def _has_direct(self, peer_id: ID) -> bool:
        return any(not lp.is_closed(c) and not lp.is_relayed(c)
                   for c in self.host.get_network().get_connections(peer_id))

    def _on_relayed_connection(self, peer_id: ID, stream: INetStream) -> bool:
        conn = lp.connection_of_stream(self.host, peer_id, stream)
        return conn is not None and lp.is_relayed(conn)

    def _retire_relayed(self, pool: list[_Channel]) -> None:
        """Stop using relayed streams; each closes when its last in-flight call ends."""
        for chan in pool:
            if chan.relayed:
                chan.retired = True
                self.stats.streams_retired += 1
                if not chan.pending:
                    self.nursery.start_soon(reset_quietly, chan.stream)
        pool[:] = [c for c in pool if not c.retired]

    async def _open_stream(self, peer_id: ID, addrs: Sequence[str]) -> INetStream:
        try:
            with trio.fail_after(self.connect_timeout):
                if peer_id not in self.host.get_connected_peers():
                    if self.connector is not None:  # e.g. NatTraversal: direct, else relayed
                        await self.connector(peer_id, list(addrs))
                    else:
                        maddrs = [multiaddr.Multiaddr(a.split("/p2p/")[0]
                                                      if a.count("/p2p/") == 1 else a)
                                  for a in addrs]
                        await self.host.connect(PeerInfo(peer_id, maddrs))
                return await self.host.new_stream(peer_id, [TProtocol(self.protocol)])
        except trio.TooSlowError:
            raise UnreachableError(f"could not open a stream to {peer_id} in time") from None
        except Exception as e:
            raise UnreachableError(f"could not reach {peer_id}: {type(e).__name__}: {e}") from None

    async def _read_replies(self, peer_id: ID, chan: _Channel) -> None:
        """Hand each reply to its waiting caller (see module docstring for the bounds)."""
        reader = BufferedStreamReader(chan.stream)
        why = "stream closed"
        try:
            while True:
                # Between replies: no deadline (each caller bounds its own wait).
                call_id = await read_call_id(reader)
                with trio.fail_after(self.reply_timeout_s):
                    lengths = await read_lengths(reader, self.limits)
                total = sum(lengths)
                with trio.fail_after(self.reply_timeout_s + total / self.min_reply_rate):
                    slot = chan.pending.get(call_id)
                    if slot is None or slot.done.is_set():  # nobody waits: never buffer it
                        self.stats.replies_dropped += 1
                        await reader.skip(total)
                        continue
                    frames = [await reader.read_exactly(n) if n else b"" for n in lengths]
                if not slot.done.is_set():
                    slot.frames = frames
                    slot.done.set()
        except trio.TooSlowError:
            self.stats.reply_timeouts += 1
            why = f"stream to {peer_id} reset: a reply came too slowly"
        except Exception as e:  # EOF, reset, oversize or garbage reply: drop the stream
            why = f"stream to {peer_id} closed: {type(e).__name__}"
        finally:
            chan.fail_all(why)
            with trio.CancelScope(shield=True):
                await reset_quietly(chan.stream)

    async def close(self) -> None:
        """Fail and reset every stream. The pools are detached first (no await between):
        a call picking a stream for a new peer while a reset awaits would otherwise change
        the dict under the loop ("dictionary changed size during iteration", as
        ``DhtSessions.close`` did at daemon start)."""
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            for chan in list(pool):
                chan.fail_all("client closed")
                await reset_quietly(chan.stream)



class Libp2pTransport:
    """CONTRACT ``Transport`` over libp2p streams (thread-safe; see module docstring)."""

    def __init__(self, thread: TrioThread, rpc: RpcClient, peer_id: str | ID,
                 addrs: Sequence[str] = ()) -> None:
        self._thread = thread
        self._rpc = rpc
        self.peer_id = peer_id if isinstance(peer_id, ID) else ID.from_base58(peer_id)
        self.addrs = list(addrs)

    def request(self, frames: Sequence[Frame], timeout: float) -> list[Frame]:
        try:
            return self._thread.call(self._rpc.call, self.peer_id, self.addrs, list(frames),
                                     float(timeout))
        except TrioThreadError as e:
            raise UnreachableError(f"libp2p node is not running: {e}") from None

    def close(self) -> None:
        """Streams are shared per peer and owned by the node; nothing to release here."""

    def __repr__(self) -> str:
        return f"Libp2pTransport({self.peer_id.to_base58()[:16]}…)"

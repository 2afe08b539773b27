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
thread-safe ``request(frames, timeout)`` through ``RpcClient.call_from_thread``, which makes
one hand-off per call: the caller's thread encodes the message and queues one callback in
the loop (``run_sync_soon``) that writes it on a ready pooled stream; the reply reader
settles the call and wakes the caller's thread directly (a ``threading.Lock``), with no
``trio.from_thread`` round trip, no task waiting for the reply and no per-call deadline scope
in the loop (the caller's own wait is the deadline; the loop then settles the call as timed
out). Calls that must open a stream first take the async path (``call``). Small messages
use the yamux fast path of ``stream_io`` (one frame each way, window credit in batches).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from volunteer.net import libp2p_adapter as lp
from volunteer.net.rpc_calls import Channel, Pending, RpcClientStats
from volunteer.net.stream_io import (
    PROTOCOL_ID,
    BufferedStreamReader,
    encode_message,
    read_call_id,
    read_call_id_nowait,
    read_lengths,
    read_lengths_nowait,
    read_payload_nowait,
    reset_quietly,
    write_bytes,
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
        self._pools: dict[ID, list[Channel]] = {}
        self._open_locks: dict[ID, trio.Lock] = {}
        self._ids = itertools.count(1)

    async def call(self, peer_id: ID, addrs: Sequence[str], frames: Sequence[Frame],
                   timeout: float) -> list[bytes]:
        """Send one request to ``peer_id``; return the reply frames (in the loop)."""
        self.stats.calls += 1
        call_id = next(self._ids)
        slot = Pending(call_id)
        await self._run_call(peer_id, addrs, encode_message(call_id, frames), slot, timeout)
        return slot.result()

    def call_from_thread(self, thread: TrioThread, peer_id: ID, addrs: Sequence[str],
                         frames: Sequence[Frame], timeout: float) -> list[bytes]:
        """``call`` from any thread but the loop's, with one hand-off into the loop.

        The message is encoded here; the loop runs ``_begin`` (a plain callback: no task, no
        ``from_thread`` round trip) which writes it on a ready pooled stream, and the reply
        reader wakes this thread directly. Past ``timeout`` the loop settles the call as
        timed out (a reply that won the race is returned). ``UnreachableError`` when the
        loop is not running."""
        if thread.in_loop():  # waiting here would block the loop that must answer
            raise RuntimeError("RpcClient.call_from_thread called in the loop: await call()")
        call_id = next(self._ids)  # itertools.count: atomic under the GIL
        data = encode_message(call_id, frames)
        slot = Pending(call_id, threaded=True)
        lock = slot.lock
        assert lock is not None
        timeout = float(timeout)
        try:
            thread.call_soon(self._begin, peer_id, addrs, data, slot, timeout)
            if not lock.acquire(timeout=min(max(0.0, timeout), threading.TIMEOUT_MAX)):
                thread.call_soon(self._expire, peer_id, slot, timeout)
                while not lock.acquire(timeout=1.0):  # the loop settles it at once
                    if not thread.running:
                        raise TrioThreadError("event loop stopped")
        except TrioThreadError as e:
            raise UnreachableError(f"libp2p node is not running: {e}") from None
        return slot.result()

    def _begin(self, peer_id: ID, addrs: Sequence[str], data: bytes, slot: Pending,
               timeout: float) -> None:
        """(loop) Start a threaded call: straight onto a ready stream, else the full path.
        A callback of ``run_sync_soon`` must not raise (trio would abort the loop): any
        error settles the call instead."""
        try:
            self.stats.calls += 1
            slot.deadline = trio.current_time() + timeout
            chan = self._ready_channel(peer_id)
            if chan is None:  # a stream must be opened (or waited for): the async path
                self.nursery.start_soon(self._run_call, peer_id, addrs, data, slot, timeout)
                return
            chan.pending[slot.call_id] = slot
            slot.chan = chan
            self.nursery.start_soon(self._send, peer_id, chan, data, slot, timeout)
        except Exception as e:  # e.g. the nursery closed: the node is stopping
            self._settle(slot, error=UnreachableError(f"libp2p node is not running: "
                                                      f"{type(e).__name__}"))

    async def _send(self, peer_id: ID, chan: Channel, data: bytes, slot: Pending,
                    timeout: float) -> None:
        """(loop) Write a threaded call's request, bounded by the call's deadline."""
        if slot.done:  # the caller gave up before the loop got here: send nothing
            return
        with trio.move_on_at(slot.deadline) as scope:
            try:
                await self._write(chan, data, slot)
            except UnreachableError as e:
                self._settle(slot, error=e)
        if scope.cancelled_caught:
            self._settle(slot, error=_timed_out(peer_id, timeout))

    def _expire(self, peer_id: ID, slot: Pending, timeout: float) -> None:
        """(loop) A threaded caller's wait ran out: settle the call as timed out unless
        its reply (or an error) settled it first."""
        self._settle(slot, error=_timed_out(peer_id, timeout))

    def _settle(self, slot: Pending, frames: list[bytes] | None = None,
                error: RemoteError | None = None) -> None:
        if slot.finish(frames, error):
            if isinstance(error, RemoteTimeoutError):
                self.stats.timeouts += 1
            elif error is not None:
                self.stats.unreachable += 1
            self._after_settle(slot.chan)

    def _after_settle(self, chan: Channel | None) -> None:
        """A retired (relayed) stream closes once its last call settled."""
        if chan is not None and chan.retired and not chan.pending and not chan.broken:
            chan.broken = True
            try:
                self.nursery.start_soon(reset_quietly, chan.stream)
            except RuntimeError:  # the nursery closed: the node is stopping anyway
                pass

    async def _run_call(self, peer_id: ID, addrs: Sequence[str], data: bytes, slot: Pending,
                        timeout: float) -> None:
        """(loop) The full path: pick or open a stream, write, wait; settles ``slot``."""
        slot.event = trio.Event()
        try:
            with trio.fail_after(timeout):
                chan = await self._pick(peer_id, addrs)
                if slot.done:  # a threaded caller gave up meanwhile
                    return
                chan.pending[slot.call_id] = slot
                slot.chan = chan
                await self._write(chan, data, slot)
                await slot.event.wait()
        except trio.TooSlowError:
            self._settle(slot, error=_timed_out(peer_id, timeout))
        except UnreachableError as e:
            self._settle(slot, error=e)
        finally:
            if not slot.done:  # cancelled (the loop is stopping)
                self._settle(slot, error=UnreachableError("libp2p node stopped"))

    async def _write(self, chan: Channel, data: bytes, slot: Pending) -> None:
        """Write one request; a failed or interrupted write resets the stream and fails the
        other calls on it (``slot`` is settled by the caller: timed out or unreachable)."""
        try:  # a free lock without a scheduling round trip
            chan.write_lock.acquire_nowait()
        except trio.WouldBlock:
            await chan.write_lock.acquire()
        try:
            if chan.broken:
                raise UnreachableError("stream closed")
            ok = False
            try:
                await write_bytes(chan.stream, data)
                ok = True
            except Exception as e:
                raise UnreachableError(f"stream write failed: {type(e).__name__}") from None
            finally:
                if not ok:  # error or cancelled mid-write: the stream's framing is lost
                    chan.pending.pop(slot.call_id, None)
                    self.stats.unreachable += chan.fail_all(
                        "stream reset after an interrupted write")
                    with trio.CancelScope(shield=True):
                        await reset_quietly(chan.stream)
        finally:
            chan.write_lock.release()

    def _ready_channel(self, peer_id: ID) -> Channel | None:
        """A pooled stream a new call may use now, or None (one must be opened first)."""
        pool = self._pools.get(peer_id)
        if not pool:
            return None
        if any(c.broken for c in pool):
            pool[:] = [c for c in pool if not c.broken]
        if any(c.relayed for c in pool) and self._has_direct(peer_id):
            self._retire_relayed(pool)
        best = min(pool, key=lambda c: len(c.pending), default=None)
        if best is not None and (not best.pending or len(pool) >= self.max_streams):
            return best
        return None

    async def _pick(self, peer_id: ID, addrs: Sequence[str]) -> Channel:
        chan = self._ready_channel(peer_id)
        if chan is not None:
            return chan
        pool = self._pools.setdefault(peer_id, [])
        lock = self._open_locks.setdefault(peer_id, trio.Lock())
        async with lock:
            pool[:] = [c for c in pool if not c.broken]
            if len(pool) >= self.max_streams or (pool and any(not c.pending for c in pool)):
                return min(pool, key=lambda c: len(c.pending))
            stream = await self._open_stream(peer_id, addrs)
            chan = Channel(stream, relayed=self._on_relayed_connection(peer_id, stream))
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

    def _retire_relayed(self, pool: list[Channel]) -> None:
        """Stop using relayed streams; each closes when its last in-flight call ends."""
        for chan in pool:
            if chan.relayed:
                chan.retired = True
                self.stats.streams_retired += 1
                self._after_settle(chan)
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

    async def _read_replies(self, peer_id: ID, chan: Channel) -> None:
        """Hand each reply to its waiting caller (see module docstring for the bounds).

        Each step first takes what is already buffered (a small reply usually came in one
        chunk); only a step that must wait for the server gets its deadline."""
        reader = BufferedStreamReader(chan.stream)
        why = "stream closed"
        try:
            while True:
                # Between replies: no deadline (each caller bounds its own wait).
                call_id = read_call_id_nowait(reader)
                if call_id is None:
                    call_id = await read_call_id(reader)
                lengths = read_lengths_nowait(reader, self.limits)
                if lengths is None:
                    with trio.fail_after(self.reply_timeout_s):
                        lengths = await read_lengths(reader, self.limits)
                total = sum(lengths)
                slot = chan.pending.get(call_id)
                if slot is None or slot.done:  # nobody waits: never buffer it
                    self.stats.replies_dropped += 1
                    with trio.fail_after(self.reply_timeout_s + total / self.min_reply_rate):
                        await reader.skip(total)
                    continue
                frames = read_payload_nowait(reader, lengths)
                if frames is None:
                    with trio.fail_after(self.reply_timeout_s + total / self.min_reply_rate):
                        frames = [await reader.read_exactly(n) if n else b"" for n in lengths]
                self._settle(slot, frames=frames)  # type: ignore[arg-type]
        except trio.TooSlowError:
            self.stats.reply_timeouts += 1
            why = f"stream to {peer_id} reset: a reply came too slowly"
        except Exception as e:  # EOF, reset, oversize or garbage reply: drop the stream
            why = f"stream to {peer_id} closed: {type(e).__name__}"
        finally:
            self.stats.unreachable += chan.fail_all(why)
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
                self.stats.unreachable += chan.fail_all("client closed")
                await reset_quietly(chan.stream)



def _timed_out(peer_id: ID, timeout: float) -> RemoteTimeoutError:
    return RemoteTimeoutError(f"no reply from {peer_id} within {timeout:.1f} s")


class Libp2pTransport:
    """CONTRACT ``Transport`` over libp2p streams (thread-safe; see module docstring)."""

    def __init__(self, thread: TrioThread, rpc: RpcClient, peer_id: str | ID,
                 addrs: Sequence[str] = ()) -> None:
        self._thread = thread
        self._rpc = rpc
        self.peer_id = peer_id if isinstance(peer_id, ID) else ID.from_base58(peer_id)
        self.addrs = list(addrs)

    def request(self, frames: Sequence[Frame], timeout: float) -> list[Frame]:
        return self._rpc.call_from_thread(self._thread, self.peer_id, self.addrs, frames,
                                          float(timeout))  # type: ignore[return-value]

    def close(self) -> None:
        """Streams are shared per peer and owned by the node; nothing to release here."""

    def __repr__(self) -> str:
        return f"Libp2pTransport({self.peer_id.to_base58()[:16]}…)"

"""Kademlia requests (FIND_NODE, GET_VALUE, PUT_VALUE) on reused, bounded DHT streams.

py-libp2p opens a new stream for every DHT request (multistream negotiation each time:
~1/4 of its CPU cost here) and its helpers swallow errors. ``DhtSessions`` keeps a few
idle streams per peer and reuses them (the KAD server reads requests in a loop), closes
them after ``IDLE_CLOSE`` seconds (a py-libp2p DHT server serves at most 12 inbound DHT
streams at once, so idle ones must not hold its slots), allows at most
``PER_PEER_STREAMS`` concurrent requests per peer (the server *resets* streams beyond its
12), and raises on every failure so callers can tell dead peers from empty answers.
A request that fails on a reused stream (the server may have dropped it) is retried once
on a fresh one.

What a remote peer's answers can cost us is bounded here: every exchange has a deadline
(``REQUEST_TIMEOUT``, whatever the caller does), a reply is at most ``MAX_REPLY_BYTES``
(one registry value plus overhead), at most ``MAX_CLOSER_PEERS`` peers with
``MAX_ADDRS_PER_PEER`` addresses each are taken from one reply, and ``run_lookup`` bounds an
iterative lookup in rounds, total time and candidates kept (``LookupBounds``), so peers
that keep answering with ever "closer" new peers cannot keep a lookup going.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
import varint
from libp2p.abc import IHost, INetStream
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.records.record import make_signed_put_record
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from volunteer.net.records import MAX_VALUE_BYTES
from volunteer.net.stream_io import close_quietly, reset_quietly

PER_PEER_STREAMS = 3
MAX_IDLE_PER_PEER = 2
IDLE_CLOSE = 1.0
REQUEST_TIMEOUT = 10.0  # one request/reply exchange, at most
MAX_REPLY_BYTES = MAX_VALUE_BYTES + 64 * 1024  # a registry value + closer peers and framing
MAX_CLOSER_PEERS = 40
MAX_ADDRS_PER_PEER = 8
MAX_ADDR_BYTES = 256


@dataclass(frozen=True)
class LookupBounds:
    """Bounds on one iterative lookup: query rounds, total seconds, candidates kept."""

    max_rounds: int = 8
    timeout_s: float = 20.0
    max_candidates: int = 200


DEFAULT_LOOKUP_BOUNDS = LookupBounds()


class DhtRequestError(Exception):
    """The peer did not answer the request properly (closed, reset, garbage)."""


class DhtSessions:
    """Per-peer pools of reusable KAD streams (see module docstring)."""

    def __init__(self, host: IHost) -> None:
        self.host = host
        self._idle: dict[ID, list[tuple[float, INetStream]]] = {}
        self._slots: dict[ID, trio.Semaphore] = {}
        self.opened = 0
        self.reused = 0

    def _slot(self, peer: ID) -> trio.Semaphore:
        sem = self._slots.get(peer)
        if sem is None:
            if len(self._slots) > 4096:
                for p in [p for p, s in self._slots.items() if s.value == PER_PEER_STREAMS]:
                    del self._slots[p]
            sem = self._slots[peer] = trio.Semaphore(PER_PEER_STREAMS)
        return sem

    async def request(self, peer: ID, msg: Message) -> Message:
        data = msg.SerializeToString()
        data = varint.encode(len(data)) + data
        async with self._slot(peer):
            stream = self._take_idle(peer)
            if stream is not None:
                self.reused += 1
                try:
                    return await self._exchange(peer, stream, data)
                except DhtRequestError:
                    pass  # the server may have closed an idle stream: retry on a fresh one
            try:
                stream = await self.host.new_stream(peer, [KAD_PROTOCOL_ID])
            except Exception as e:
                raise DhtRequestError(f"cannot open a DHT stream to {peer}: {e}") from None
            self.opened += 1
            return await self._exchange(peer, stream, data)

    async def _exchange(self, peer: ID, stream: INetStream, data: bytes) -> Message:
        ok = False
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                await stream.write(data)
                raw = await read_varint_prefixed_bytes_limited(stream, MAX_REPLY_BYTES)
            reply = Message()
            reply.ParseFromString(raw)
            ok = True
            return reply
        except Exception as e:
            raise DhtRequestError(f"DHT request to {peer} failed: {type(e).__name__}") from None
        finally:
            if ok:
                self._give_back(peer, stream)
            else:
                with trio.CancelScope(shield=True):
                    await reset_quietly(stream)

    def _take_idle(self, peer: ID) -> INetStream | None:
        idle = self._idle.get(peer)
        now = time.monotonic()
        while idle:
            t, stream = idle.pop()
            if now - t < IDLE_CLOSE:
                return stream
            self._close_later(stream)
        return None

    def _give_back(self, peer: ID, stream: INetStream) -> None:
        idle = self._idle.setdefault(peer, [])
        if len(idle) >= MAX_IDLE_PER_PEER:
            self._close_later(stream)
        else:
            idle.append((time.monotonic(), stream))

    def _close_later(self, stream: INetStream) -> None:
        try:
            trio.lowlevel.spawn_system_task(close_quietly, stream)
        except RuntimeError:
            pass

    # The pool is shared by every task of the node: requests take and give back streams,
    # and the reaper drops stale peers, whenever ``reap`` or ``close`` awaits a stream's
    # close. Both therefore detach the streams they close from the pool first, in one step
    # with no await, and only then close them. ``close`` used to iterate ``self._idle``
    # across those awaits: the reaper (every IDLE_CLOSE / 2) popping a peer meanwhile, or a
    # request giving a stream back to a new one, raised "dictionary changed size during
    # iteration" out of ``SwarmNode.set_dht_server`` (the switch to DHT server mode in
    # ``NetworkService.start``). The more peers, the longer ``close`` takes: it killed the
    # start of daemons joining a swarm of 20-30 (scripts/bench_scale.py --preset full).
    async def reap(self) -> None:
        """Close streams idle longer than ``IDLE_CLOSE`` (run as a background task)."""
        while True:
            await trio.sleep(IDLE_CLOSE / 2)
            for stream in self._detach_stale(time.monotonic()):
                await close_quietly(stream)

    def _detach_stale(self, now: float) -> list[INetStream]:
        """Remove the streams idle since ``IDLE_CLOSE`` from the pool; return them."""
        stale: list[INetStream] = []
        for peer, idle in list(self._idle.items()):
            keep = [(t, s) for t, s in idle if now - t < IDLE_CLOSE]
            stale.extend(s for t, s in idle if now - t >= IDLE_CLOSE)
            if keep:
                self._idle[peer] = keep
            else:
                del self._idle[peer]
        return stale

    async def close(self) -> None:
        """Close every idle stream (streams given back meanwhile stay pooled)."""
        idle, self._idle = self._idle, {}
        for streams in idle.values():
            for _t, s in streams:
                await close_quietly(s)




def _closer_peers(host: IHost, reply: Message) -> list[ID]:
    out: list[ID] = []
    store = host.get_peerstore()
    for pd in reply.closerPeers[:MAX_CLOSER_PEERS]:
        try:
            pid = ID(pd.id)
            addrs = [multiaddr.Multiaddr(a) for a in pd.addrs[:MAX_ADDRS_PER_PEER]
                     if len(a) <= MAX_ADDR_BYTES]
        except Exception:
            continue
        if addrs:
            store.add_addrs(pid, addrs, 3600)
            out.append(pid)
    return out


async def find_node(sessions: DhtSessions, peer: ID, key: bytes) -> list[ID]:
    """FIND_NODE: the peer's closest known peers to ``key`` (addresses go to the peerstore)."""
    msg = Message()
    msg.type = Message.MessageType.FIND_NODE
    msg.key = key
    reply = await sessions.request(peer, msg)
    if reply.type != Message.MessageType.FIND_NODE:
        raise DhtRequestError("unexpected reply type to FIND_NODE")
    return _closer_peers(sessions.host, reply)


async def get_value(sessions: DhtSessions, peer: ID, key: bytes) -> bytes | None:
    """GET_VALUE: the value the peer holds for ``key`` (None if it has none)."""
    msg = Message()
    msg.type = Message.MessageType.GET_VALUE
    msg.key = key
    reply = await sessions.request(peer, msg)
    if reply.type != Message.MessageType.GET_VALUE:
        raise DhtRequestError("unexpected reply type to GET_VALUE")
    if reply.HasField("record") and reply.record.value:
        return bytes(reply.record.value)
    return None


async def put_value(sessions: DhtSessions, peer: ID, key: bytes, value: bytes,
                    record: Any | None = None) -> bool:
    """PUT_VALUE: True when the peer stored it (it resets the stream when it refuses)."""
    msg = Message()
    msg.type = Message.MessageType.PUT_VALUE
    msg.key = key
    msg.record.CopyFrom(record if record is not None else
                        make_signed_put_record(key, value, sessions.host.get_private_key()))
    msg.record.ClearField("timeReceived")
    try:
        reply = await sessions.request(peer, msg)
    except DhtRequestError:
        return False
    return reply.type == Message.MessageType.PUT_VALUE and reply.key == key


async def run_lookup(key: bytes, start: Iterable[ID],
                     query: Callable[[ID], Awaitable[list[ID] | None]], *, count: int,
                     alpha: int, exclude: ID | None = None,
                     bounds: LookupBounds = DEFAULT_LOOKUP_BOUNDS) -> list[ID]:
    """Iterative Kademlia lookup of the ``count`` closest peers to ``key`` that answered.

    ``query(peer)`` returns the peer's closer peers, or None when it did not answer (it
    bounds its own request). Each round asks up to ``alpha`` of the closest candidates not
    asked yet; the lookup stops when none is left, after ``bounds.max_rounds`` rounds or
    ``bounds.timeout_s`` seconds (queries still running are cancelled; what answered so
    far counts), and keeps only the ``bounds.max_candidates`` closest candidates.
    """
    candidates: set[ID] = set(start)
    candidates.discard(exclude)  # type: ignore[arg-type]
    queried: set[ID] = set()
    answered: set[ID] = set()

    async def ask(peer: ID) -> None:
        got = await query(peer)
        if got is None:
            return
        answered.add(peer)
        candidates.update(p for p in got[:MAX_CLOSER_PEERS] if p != exclude)

    with trio.move_on_after(bounds.timeout_s):
        for _round in range(bounds.max_rounds):
            best = sort_peer_ids_by_distance(key, list(candidates - (queried - answered)))
            todo = [p for p in best[:count] if p not in queried][:alpha]
            if not todo:
                break
            queried.update(todo)
            async with trio.open_nursery() as nursery:
                for peer in todo:
                    nursery.start_soon(ask, peer)
            if len(candidates) > bounds.max_candidates:
                keep = sort_peer_ids_by_distance(key, list(candidates))[:bounds.max_candidates]
                candidates.intersection_update(set(keep) | answered)
    return sort_peer_ids_by_distance(key, list(answered))[:count]

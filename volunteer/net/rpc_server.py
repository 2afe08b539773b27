"""Serve expert RPC over libp2p streams through the runtime's in-process entry point.

``RpcServer(host, submit)`` registers ``/volunteer/expert-rpc/1.0.0`` (``protocol=`` another
id: the shard protocol of ``shard_rpc.py`` runs on the same machinery). Each inbound stream
is long-lived: a reader task takes messages (``stream_io``: call id + wire frames), hands
the frames to ``submit(frames, reply)`` without waiting for compute, and a writer task
sends replies as they come. ``reply`` is called from a runtime thread; it hops back into
trio with the trio token (``run_sync_soon``), the only trio/runtime bridge on this path.

What a peer can make this server hold, and for how long:

- **Bytes, in total**: every message reserves its declared size from one ``ByteBudget``
  (``max_inflight_bytes``, shared by all streams and peers) after its frame lengths are
  read and *before* its body is read; the reservation is released once its reply was
  written. Over budget the message is answered ``overloaded`` and its body is never read.
  Beyond the budget the path holds per stream at most one read chunk (64 KiB) and the
  frame lengths (<= 17 x 4 bytes), plus py-libp2p's yamux receive window per stream.
- **Requests, per peer**: ``PeerLimits`` (token bucket + concurrent requests per peer over
  all its streams, LRU table of peers): beyond them a message is answered ``overloaded``
  (rate limited) at once, so one flooding peer cannot starve the others. Per stream, at
  most ``max_inflight`` requests wait for replies (the reader stops reading: backpressure).
- **Time**: the first byte of a message must come within ``idle_timeout_s``; the rest
  within ``read_timeout_s + size / min_read_rate``; a reply write within the same kind of
  deadline. A slow or silent peer loses its stream instead of holding buffers.
- **Refusals keep the stream when cheap**: a refused message of at most ``SKIP_MAX`` bytes
  is discarded (bounded chunks) and the stream goes on; a larger one is not read: after
  its typed reply and the replies in flight, the stream is reset. A framing violation is
  answered with a typed error and the stream closed; garbage inside well-framed messages
  is answered by the runtime with ``bad_request`` and the stream goes on.
- **Not on the event loop**: payload frames are read into their own writable buffers (the
  decoder wraps them without a copy); requests of ``offload_bytes`` or more are submitted
  (decoded and validated) in a worker thread, and large replies are written frame by frame.
- **Bandwidth caps**: with ``traffic`` (``volunteer.net.rate_limit.Traffic``) a request's
  body is paid for in the download bucket before it is read (the peer waits in its yamux
  window) and a reply in the upload bucket before it is written; ``traffic`` None (the
  default, or set to None later) skips both.
- **Cheap per message**: a small message that arrived whole is taken from the reader's
  buffer without awaits or deadline scopes (``read_*_nowait``: the same limit checks, in
  the same order); only a step that must wait for the peer sets its deadline. Replies and
  reads take ``stream_io``'s yamux fast path (one frame per small reply, window credit in
  batches).

Nothing a peer sends can crash the handler or the host.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from volunteer.net.byte_budget import ByteBudget
from volunteer.net.peer_limits import DEFAULT_PEER_LIMITS, PeerLimiter, PeerLimits, refusal_message
from volunteer.net.rate_limit import Traffic
from volunteer.net.stream_io import (
    PROTOCOL_ID,
    BufferedStreamReader,
    StreamClosedError,
    read_call_id,
    read_call_id_nowait,
    read_lengths,
    read_lengths_nowait,
    read_payload,
    read_payload_nowait,
    write_message,
)
from volunteer.wire.errors import OverloadedError, RemoteError, TooLargeError
from volunteer.wire.limits import DEFAULT_LIMITS, WireLimits
from volunteer.wire.messages import encode_error

log = logging.getLogger(__name__)

Frames = Sequence[bytes | memoryview]
SubmitFn = Callable[[list, Callable[[list], None]], None]
DRAIN_REPLIES_TIMEOUT = 60.0
DEFAULT_INFLIGHT_BYTES = 1024 * 2**20  # the runtime's default max_queued_bytes
SKIP_MAX = 64 * 1024  # refused bodies up to this size are discarded to keep the stream
OFFLOAD_BYTES = 1 << 20  # requests this large are decoded in a worker thread


@dataclass
class RpcServerStats:
    streams_opened: int = 0
    streams_open: int = 0
    requests: int = 0
    framing_errors: int = 0
    rate_limited: int = 0
    over_budget: int = 0
    timeouts: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    budget: ByteBudget | None = field(default=None, repr=False)
    peers: PeerLimiter | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        out = {"streams_opened": self.streams_opened, "streams_open": self.streams_open,
               "requests": self.requests, "framing_errors": self.framing_errors,
               "rate_limited": self.rate_limited, "over_budget": self.over_budget,
               "timeouts": self.timeouts, "errors": dict(self.errors)}
        if self.budget is not None:
            out["inflight_bytes"] = self.budget.snapshot()
        if self.peers is not None:
            out["peers"] = {"tracked": len(self.peers), **self.peers.stats.as_dict()}
        return out


class _Flow:
    """Per-stream bookkeeping shared by the reader and the writer."""

    def __init__(self, max_inflight: int) -> None:
        self.slots = trio.Semaphore(max_inflight)
        self.pending = 0
        self.reader_done = False
        self.reset = False  # bytes were left unread: reset instead of close
        self.idle = trio.Event()


class _Ticket:
    """What one message holds until its reply is written (or it is dropped): a stream
    slot, possibly a peer slot and reserved bytes. ``release`` is idempotent."""

    __slots__ = ("done", "flow", "nbytes", "peer", "server")

    def __init__(self, server: RpcServer, flow: _Flow) -> None:
        self.server = server
        self.flow = flow
        self.peer: object | None = None
        self.nbytes = 0
        self.done = False

    def release(self) -> None:
        if self.done:
            return
        self.done = True
        if self.nbytes:
            self.server.budget.release(self.nbytes)
        if self.peer is not None:
            self.server.peers.leave(self.peer)
        flow = self.flow
        flow.pending -= 1
        flow.slots.release()
        if flow.reader_done and not flow.pending:
            flow.idle.set()


class RpcServer:
    """Stream handler that feeds the runtime (see module docstring)."""

    def __init__(self, host: IHost, submit: SubmitFn, limits: WireLimits = DEFAULT_LIMITS,
                 max_inflight: int = 64, protocol: str = PROTOCOL_ID, *,
                 max_inflight_bytes: int = DEFAULT_INFLIGHT_BYTES,
                 peer_limits: PeerLimits | None = None,
                 offload_bytes: int = OFFLOAD_BYTES,
                 traffic: Traffic | None = None) -> None:
        """``traffic``: bandwidth caps and byte meter (None: none); may be replaced later by
        assigning ``.traffic`` from any thread (read once per message)."""
        self.host = host
        self.traffic = traffic
        self.protocol = protocol
        self.submit = submit
        self.limits = limits
        self.max_inflight = max_inflight
        self.peer_limits = peer_limits or DEFAULT_PEER_LIMITS
        self.budget = ByteBudget(max_inflight_bytes)
        self.peers = PeerLimiter(self.peer_limits)
        self.offload_bytes = offload_bytes
        self.stats = RpcServerStats(budget=self.budget, peers=self.peers)

    def install(self) -> None:
        self.host.set_stream_handler(TProtocol(self.protocol), self.handle_stream)

    async def handle_stream(self, stream: INetStream) -> None:
        self.stats.streams_opened += 1
        self.stats.streams_open += 1
        flow = _Flow(self.max_inflight)
        try:
            await self._serve(stream, flow)
        except Exception as e:  # never let a peer's stream take anything else down
            log.debug("expert-rpc stream ended: %r", e)
            flow.reset = True
        finally:
            self.stats.streams_open -= 1
            with trio.move_on_after(1.0) as scope:
                scope.shield = True
                try:
                    await (stream.reset() if flow.reset else stream.close())
                except Exception:
                    pass

    async def _serve(self, stream: INetStream, flow: _Flow) -> None:
        token = trio.lowlevel.current_trio_token()
        send, recv = trio.open_memory_channel[tuple[int, Frames, _Ticket]](math.inf)
        peer = _peer_of(stream)

        def deliver(item: tuple[int, Frames, _Ticket]) -> None:
            try:
                send.send_nowait(item)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                item[2].release()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, stream, recv)
            reader = BufferedStreamReader(stream)
            try:
                while True:
                    await flow.slots.acquire()
                    flow.pending += 1
                    ticket = _Ticket(self, flow)
                    if not await self._next_message(reader, ticket, peer, token, deliver):
                        break
            except StreamClosedError:
                ticket.release()
            except trio.TooSlowError:  # a read deadline passed: the stream is out of sync
                self.stats.timeouts += 1
                flow.reset = True
                ticket.release()
            except Exception as e:  # a bug here must not lose the replies in flight
                log.warning("expert-rpc reader failed: %r", e)
                flow.reset = True
                ticket.release()
            # The peer stopped sending (or broke framing): flush what is in flight.
            flow.reader_done = True
            if flow.pending:
                with trio.move_on_after(DRAIN_REPLIES_TIMEOUT):
                    await flow.idle.wait()
            send.close()

    async def _next_message(self, reader: BufferedStreamReader, ticket: _Ticket, peer: object,
                            token: trio.lowlevel.TrioToken,
                            deliver: Callable[[tuple[int, Frames, _Ticket]], None]) -> bool:
        """Read, admit and submit one message; False when the stream must stop."""
        lim = self.peer_limits
        # Each step first looks at what is already buffered (a small message usually came
        # in one chunk: no await, no deadline to set up); only a step that must wait for
        # the peer gets its deadline.
        call_id = read_call_id_nowait(reader)
        if call_id is None:
            with trio.move_on_after(lim.idle_timeout_s) as idle:
                call_id = await read_call_id(reader)
            if idle.cancelled_caught:  # nothing started: close quietly
                ticket.release()
                return False
        try:
            lengths = read_lengths_nowait(reader, self.limits)
            if lengths is None:
                with trio.fail_after(lim.read_timeout_s):
                    lengths = await read_lengths(reader, self.limits)
        except RemoteError as e:
            self.stats.framing_errors += 1
            self._refuse(ticket, call_id, e, deliver)
            return False
        total = sum(lengths)
        refusal = self._admit(ticket, peer, total)
        if refusal is not None:
            self._refuse(ticket, call_id, refusal, deliver)
            if total > SKIP_MAX:
                ticket.flow.reset = True
                return False
            with trio.fail_after(lim.read_deadline_s(total)):
                await reader.skip(total)
            return True
        traffic = self.traffic
        if traffic is not None:
            await traffic.receive_async(total)
        frames = read_payload_nowait(reader, lengths)
        if frames is None:
            with trio.fail_after(lim.read_deadline_s(total)):
                frames = await read_payload(reader, lengths)
        self.stats.requests += 1
        if total >= self.offload_bytes:
            await trio.to_thread.run_sync(self._submit_one, call_id, frames, ticket, token,
                                          deliver)
        else:
            self._submit_one(call_id, frames, ticket, token, deliver)
        return True

    def _admit(self, ticket: _Ticket, peer: object, nbytes: int) -> RemoteError | None:
        """Take a peer slot and ``nbytes`` of budget for the ticket, or say why not."""
        why = self.peers.try_enter(peer)
        if why is not None:
            self.stats.rate_limited += 1
            return OverloadedError(refusal_message(why, self.peer_limits))
        ticket.peer = peer
        if nbytes > self.budget.capacity:
            return TooLargeError(f"message of {nbytes} bytes > this node's in-flight budget "
                                 f"of {self.budget.capacity} bytes")
        if not self.budget.try_reserve(nbytes):
            self.stats.over_budget += 1
            return OverloadedError(f"node holds {self.budget.held} bytes of requests (max "
                                   f"{self.budget.capacity}); retry later or elsewhere")
        ticket.nbytes = nbytes
        return None

    def _refuse(self, ticket: _Ticket, call_id: int, err: RemoteError,
                deliver: Callable[[tuple[int, Frames, _Ticket]], None]) -> None:
        self._count(err.code)
        deliver((call_id, encode_error(None, err.code, err.message), ticket))

    def _submit_one(self, call_id: int, frames: list, ticket: _Ticket,
                    token: trio.lowlevel.TrioToken,
                    deliver: Callable[[tuple[int, Frames, _Ticket]], None]) -> None:
        """Hand one request to ``submit`` (trio thread or a worker thread)."""
        replied = [False]

        def reply(out: list) -> None:
            if replied[0]:
                return
            replied[0] = True
            try:
                token.run_sync_soon(deliver, (call_id, out, ticket))
            except trio.RunFinishedError:
                pass

        try:
            self._dispatch(frames, reply, ticket)
        except Exception as e:  # the runtime should never raise; answer anyway
            log.warning("runtime submit raised: %r", e)
            self._count_threadsafe(token, "internal")
            reply(encode_error(None, "internal", f"submit failed: {type(e).__name__}"))

    def _dispatch(self, frames: list, reply: Callable[[list], None], ticket: _Ticket) -> None:
        """Where an admitted message goes: ``submit`` here; a subclass that needs the
        sender's authenticated peer id (``ticket.peer``) overrides this one method."""
        self.submit(frames, reply)

    async def _writer(self, stream: INetStream, recv: trio.MemoryReceiveChannel) -> None:
        lim = self.peer_limits
        async with recv:
            async for call_id, frames, ticket in recv:
                try:
                    size = sum(memoryview(f).nbytes for f in frames)
                    traffic = self.traffic
                    if traffic is not None:
                        await traffic.send_async(size)
                    with trio.fail_after(lim.read_deadline_s(size)):
                        await write_message(stream, call_id, frames)
                except Exception as e:  # includes trio.TooSlowError
                    log.debug("dropping a reply: %r", e)
                    ticket.flow.reset = True
                finally:
                    ticket.release()

    def _count(self, code: str) -> None:
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1

    def _count_threadsafe(self, token: trio.lowlevel.TrioToken, code: str) -> None:
        try:
            token.run_sync_soon(self._count, code)
        except trio.RunFinishedError:
            pass


def _peer_of(stream: INetStream) -> object:
    """The remote peer's id (the key of its per-peer limits)."""
    try:
        return stream.muxed_conn.peer_id
    except Exception:
        return None

"""Serve expert RPC over libp2p streams through the runtime's in-process entry point.

``RpcServer(host, submit)`` registers ``/volunteer/expert-rpc/1.0.0`` (``protocol=`` another
id: the shard protocol of ``shard_rpc.py`` runs on the same machinery). Each inbound stream
is long-lived: a reader task takes messages (``stream_io``: call id + wire frames), hands
the frames to ``submit(frames, reply)`` without waiting for compute, and a writer task
sends replies as they come. ``reply`` is called from a runtime thread; it hops back into
trio with the trio token (``run_sync_soon``), the only trio/runtime bridge on this path.

Bounds: at most ``max_inflight`` requests per stream (the reader stops reading until a
reply went out: backpressure instead of unbounded queues), wire limits checked before any
payload is read. A framing violation gets a typed error reply and the stream is closed;
garbage inside well-framed messages is answered by the runtime with ``bad_request`` and
the stream goes on. Nothing a peer sends can crash the handler or the host.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from volunteer.net.stream_io import (
    PROTOCOL_ID,
    BufferedStreamReader,
    StreamClosedError,
    encode_message,
    read_body,
    read_call_id,
)
from volunteer.wire.errors import RemoteError
from volunteer.wire.limits import DEFAULT_LIMITS, WireLimits
from volunteer.wire.messages import encode_error

log = logging.getLogger(__name__)

Frames = Sequence[bytes | memoryview]
SubmitFn = Callable[[list[bytes], Callable[[list], None]], None]
DRAIN_REPLIES_TIMEOUT = 60.0


@dataclass
class RpcServerStats:
    streams_opened: int = 0
    streams_open: int = 0
    requests: int = 0
    framing_errors: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"streams_opened": self.streams_opened, "streams_open": self.streams_open,
                "requests": self.requests, "framing_errors": self.framing_errors,
                "errors": dict(self.errors)}


class _Flow:
    """Per-stream bookkeeping shared by the reader and the writer."""

    def __init__(self) -> None:
        self.pending = 0
        self.reader_done = False
        self.idle = trio.Event()


class RpcServer:
    """Stream handler that feeds the runtime (see module docstring)."""

    def __init__(self, host: IHost, submit: SubmitFn, limits: WireLimits = DEFAULT_LIMITS,
                 max_inflight: int = 64, protocol: str = PROTOCOL_ID) -> None:
        self.host = host
        self.protocol = protocol
        self.submit = submit
        self.limits = limits
        self.max_inflight = max_inflight
        self.stats = RpcServerStats()

    def install(self) -> None:
        self.host.set_stream_handler(TProtocol(self.protocol), self.handle_stream)

    async def handle_stream(self, stream: INetStream) -> None:
        self.stats.streams_opened += 1
        self.stats.streams_open += 1
        try:
            await self._serve(stream)
        except Exception as e:  # never let a peer's stream take anything else down
            log.debug("expert-rpc stream ended: %r", e)
        finally:
            self.stats.streams_open -= 1
            try:
                await stream.close()
            except Exception:
                pass

    async def _serve(self, stream: INetStream) -> None:
        token = trio.lowlevel.current_trio_token()
        send, recv = trio.open_memory_channel[tuple[int, Frames]](math.inf)
        slots = trio.Semaphore(self.max_inflight)
        flow = _Flow()

        def deliver(item: tuple[int, Frames]) -> None:
            try:
                send.send_nowait(item)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, stream, recv, slots, flow)
            reader = BufferedStreamReader(stream)
            try:
                while True:
                    call_id = await read_call_id(reader)
                    try:
                        frames = await read_body(reader, self.limits)
                    except RemoteError as e:
                        self.stats.framing_errors += 1
                        self._count(e.code)
                        await slots.acquire()
                        flow.pending += 1
                        deliver((call_id, encode_error(None, e.code, e.message)))
                        break
                    await slots.acquire()
                    flow.pending += 1
                    self._submit_one(call_id, frames, token, deliver)
            except StreamClosedError:
                pass
            # The peer stopped sending (or broke framing): flush what is in flight.
            flow.reader_done = True
            with trio.move_on_after(DRAIN_REPLIES_TIMEOUT):
                if flow.pending:
                    await flow.idle.wait()
            send.close()

    def _submit_one(self, call_id: int, frames: list[bytes], token: trio.lowlevel.TrioToken,
                    deliver: Callable[[tuple[int, Frames]], None]) -> None:
        self.stats.requests += 1
        replied = [False]

        def reply(out: list) -> None:
            if replied[0]:
                return
            replied[0] = True
            try:
                token.run_sync_soon(deliver, (call_id, out))
            except trio.RunFinishedError:
                pass

        try:
            self.submit(frames, reply)
        except Exception as e:  # the runtime should never raise; answer anyway
            log.warning("runtime submit raised: %r", e)
            self._count("internal")
            if not replied[0]:
                replied[0] = True
                deliver((call_id, encode_error(None, "internal", f"submit failed: {e}")))

    async def _writer(self, stream: INetStream, recv: trio.MemoryReceiveChannel,
                      slots: trio.Semaphore, flow: _Flow) -> None:
        async with recv:
            async for call_id, frames in recv:
                try:
                    await stream.write(encode_message(call_id, frames))
                finally:
                    flow.pending -= 1
                    slots.release()
                    if flow.reader_done and not flow.pending:
                        flow.idle.set()

    def _count(self, code: str) -> None:
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1

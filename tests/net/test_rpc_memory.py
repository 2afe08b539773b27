"""The expert-RPC server on real libp2p hosts (loopback): bytes in flight stay under one
budget for all streams, a declared body over it is refused without being read, a flooding
peer is rate-limited while a polite one is served, slow and silent streams lose their
stream, large requests are decoded off the event loop. No timing asserts."""

from __future__ import annotations

import struct
import threading

import pytest
import trio

from tests.net.swarm_helpers import swarm, wait_for
from volunteer.net.peer_limits import PeerLimits
from volunteer.net.rpc_server import RpcServer
from volunteer.net.stream_io import (
    BufferedStreamReader,
    StreamClosedError,
    encode_message,
    read_body,
    read_call_id,
)
from volunteer.wire.errors import OverloadedError, TooLargeError
from volunteer.wire.limits import WireLimits
from volunteer.wire.messages import decode_reply, encode_error

PROTO = "/volunteer/test-rpc/1"
LIMITS = WireLimits(max_header_bytes=1024, max_tensors=4, max_elements=2**22, max_bytes=16 << 20)
pytestmark = pytest.mark.timeout(90)


class Echo:
    """A ``submit`` that answers at once (or holds the reply while ``hold`` is set) and
    records which thread each request was submitted from."""

    def __init__(self) -> None:
        self.hold = False
        self.held: list = []
        self.threads: list[tuple[int, int]] = []  # (payload bytes, thread ident)

    def __call__(self, frames: list, reply) -> None:
        self.threads.append((sum(len(f) for f in frames), threading.get_ident()))
        out = encode_error(None, "bad_request", "echo")  # any typed reply will do
        if self.hold:
            self.held.append((reply, out))
        else:
            reply(out)


def message(call_id: int, payload: int) -> bytes:
    return encode_message(call_id, [b"h", b"\0" * payload])


async def ask(stream, reader, call_id: int, payload: int) -> Exception | None:
    """Send one message and return its decoded typed error (the echo answers bad_request)."""
    await stream.write(message(call_id, payload))
    assert await read_call_id(reader) == call_id
    try:
        decode_reply(await read_body(reader))
    except Exception as e:
        return e
    return None


def test_over_budget_body_is_refused_unread_and_budget_bounds_all_streams(tmp_path):
    echo = Echo()

    async def main():
        async with swarm(tmp_path, 3) as (a, b, c):
            server = RpcServer(a.host, echo, LIMITS, protocol=PROTO, max_inflight_bytes=1 << 20)
            server.install()
            echo.hold = True
            sb = await b.host.new_stream(a.peer_id, [PROTO])
            await sb.write(message(1, 600_000))  # fits: held until we let the reply go
            await wait_for(lambda: server.budget.held >= 600_000)
            # another peer declares 600 KB but sends no body: answered at once, body unread
            sc = await c.host.new_stream(a.peer_id, [PROTO])
            rc = BufferedStreamReader(sc)
            await sc.write(struct.pack("<QIII", 2, 2, 1, 600_000))
            assert await read_call_id(rc) == 2
            with pytest.raises(OverloadedError, match="bytes of requests"):
                decode_reply(await read_body(rc))
            with pytest.raises(StreamClosedError):  # too big to skip: the stream is reset
                await read_call_id(rc)
            # larger than the whole budget: too_large, also without a body
            sc2 = await c.host.new_stream(a.peer_id, [PROTO])
            rc2 = BufferedStreamReader(sc2)
            await sc2.write(struct.pack("<QIII", 3, 2, 1, 8 << 20))
            assert await read_call_id(rc2) == 3
            with pytest.raises(TooLargeError, match="in-flight budget"):
                decode_reply(await read_body(rc2))
            assert server.budget.peak <= server.budget.capacity
            assert server.stats.over_budget == 1
            # the held request is answered; its bytes come back; the node serves again
            reply, out = echo.held.pop()
            echo.hold = False
            reply(out)
            rb = BufferedStreamReader(sb)
            assert await read_call_id(rb) == 1
            await read_body(rb)
            await wait_for(lambda: server.budget.held == 0)
            sc3 = await c.host.new_stream(a.peer_id, [PROTO])
            err = await ask(sc3, BufferedStreamReader(sc3), 4, 600_000)
            assert err is not None and err.code == "bad_request"

    trio.run(main)


def test_flooding_peer_is_rate_limited_while_polite_peer_is_served(tmp_path):
    echo = Echo()
    # refill is negligible next to the test: at most ``burst`` + a fraction get through
    limits = PeerLimits(requests_per_s=0.01, burst=10)

    async def main():
        async with swarm(tmp_path, 3) as (a, flooder, polite):
            server = RpcServer(a.host, echo, LIMITS, protocol=PROTO, peer_limits=limits)
            server.install()
            sf = await flooder.host.new_stream(a.peer_id, [PROTO])
            await sf.write(b"".join(message(i, 100) for i in range(1, 61)))
            rf = BufferedStreamReader(sf)
            codes = []
            for _ in range(60):  # every flood message is answered on the same stream
                await read_call_id(rf)
                try:
                    decode_reply(await read_body(rf))
                except OverloadedError as e:
                    assert "rate limited" in e.message
                    codes.append("overloaded")
                except Exception as e:
                    codes.append(getattr(e, "code", type(e).__name__))
            assert codes.count("overloaded") >= 49 and set(codes) == {"overloaded", "bad_request"}
            sp = await polite.host.new_stream(a.peer_id, [PROTO])
            rp = BufferedStreamReader(sp)
            for i in range(5):
                err = await ask(sp, rp, 100 + i, 100)
                assert err is not None and err.code == "bad_request"  # served by the echo
            assert server.stats.rate_limited >= 49 and len(server.peers) == 2

    trio.run(main)


def test_slow_and_silent_streams_are_closed_and_release_their_bytes(tmp_path):
    echo = Echo()
    limits = PeerLimits(idle_timeout_s=0.5, read_timeout_s=0.5, min_read_rate=1 << 30)

    async def main():
        async with swarm(tmp_path, 2) as (a, b):
            server = RpcServer(a.host, echo, LIMITS, protocol=PROTO, peer_limits=limits,
                               max_inflight_bytes=1 << 20)
            server.install()
            slow = await b.host.new_stream(a.peer_id, [PROTO])
            await slow.write(struct.pack("<QIII", 1, 2, 1, 500_000) + b"h" + b"\0" * 1000)
            await wait_for(lambda: server.budget.held == 500_001)  # header byte + body
            with pytest.raises(StreamClosedError):  # body never finished: reset, bytes back
                await read_call_id(BufferedStreamReader(slow))
            await wait_for(lambda: server.budget.held == 0 and server.stats.timeouts == 1)
            silent = await b.host.new_stream(a.peer_id, [PROTO])
            with pytest.raises(StreamClosedError):  # never starts a message: closed
                await read_call_id(BufferedStreamReader(silent))
            await wait_for(lambda: server.stats.streams_open == 0)

    trio.run(main)


def test_large_requests_are_submitted_off_the_event_loop(tmp_path):
    echo = Echo()

    async def main():
        async with swarm(tmp_path, 2) as (a, b):
            server = RpcServer(a.host, echo, LIMITS, protocol=PROTO, offload_bytes=1 << 20)
            server.install()
            s = await b.host.new_stream(a.peer_id, [PROTO])
            r = BufferedStreamReader(s)
            assert (await ask(s, r, 1, 100)).code == "bad_request"
            assert (await ask(s, r, 2, 3 << 20)).code == "bad_request"
            loop_thread = threading.get_ident()
            (small, t_small), (large, t_large) = echo.threads
            assert small < large and t_small == loop_thread and t_large != loop_thread

    trio.run(main)


def test_large_replies_arrive_intact_frame_by_frame(tmp_path):
    payload = bytes(range(256)) * (4 << 12)  # 4 MiB, written as prefix + separate frames

    def mirror(frames: list, reply) -> None:
        reply([b"head", memoryview(frames[1]), b"tail"])

    async def main():
        async with swarm(tmp_path, 2) as (a, b):
            RpcServer(a.host, mirror, LIMITS, protocol=PROTO).install()
            s = await b.host.new_stream(a.peer_id, [PROTO])
            r = BufferedStreamReader(s)
            await s.write(encode_message(5, [b"h", payload]))
            assert await read_call_id(r) == 5
            big = WireLimits(max_header_bytes=1024, max_tensors=4, max_bytes=32 << 20)
            assert await read_body(r, big) == [b"head", payload, b"tail"]

    trio.run(main)

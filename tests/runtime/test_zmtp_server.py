"""The project's own ZMTP server behind ``ZmqFrontend``, attacked over real loopback sockets.

Bounds are checked with the runtime's and the server's own counters (bytes reserved, peak,
connections), never with RSS or timing; every test waits for an outcome (a reply, a closed
connection, a counter), never for a time.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator

import pytest
import torch
import zmq

from tests.runtime.servers import make_backends, wait_for
from volunteer.runtime.limits import ServingLimits
from volunteer.runtime.runtime import Runtime
from volunteer.runtime.zmq_frontend import ZmqFrontend
from volunteer.runtime.zmtp_conn import HELLO, ready_command
from volunteer.wire.errors import OverloadedError
from volunteer.wire.messages import decode_reply, encode_request
from volunteer.wire.zmtp import GREETING, LONG, MORE, ZmtpConnection

pytestmark = pytest.mark.timeout(120)
H = 256
KB = 1024


@contextlib.contextmanager
def serving(limits: ServingLimits, **server: object) -> Iterator[tuple[Runtime, ZmqFrontend]]:
    runtime = Runtime(make_backends({"n.0": ("nop", H)}), limits)
    runtime.start()
    frontend = ZmqFrontend(runtime, server=server)
    try:
        frontend.start()
        yield runtime, frontend
    finally:
        frontend.stop()
        runtime.stop()


def address(endpoint: str) -> tuple[str, int]:
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    return host, int(port)


def connect(endpoint: str, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(30)
    s.connect(address(endpoint))
    return s


def client(fe: ZmqFrontend) -> contextlib.closing:
    """Our own DEALER client (``volunteer.wire.zmtp``), closed on exit."""
    return contextlib.closing(ZmtpConnection(*address(fe.endpoint), time.monotonic() + 30))


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "server closed the connection during the handshake"
        out += chunk
    return out


def peer(endpoint: str, rcvbuf: int | None = None) -> socket.socket:
    """A raw TCP connection that completed the ZMTP handshake as a DEALER."""
    s = connect(endpoint, rcvbuf)
    s.sendall(GREETING + ready_command(b"DEALER"))
    assert recv_exact(s, len(HELLO)) == HELLO
    return s


def frame(body: bytes, more: bool = False, announced: int | None = None) -> bytes:
    """One ZMTP frame (``announced`` claims another size than ``len(body)``)."""
    n = len(body) if announced is None else announced
    flags = MORE if more else 0
    head = bytes((flags, n)) if n < 256 else struct.pack(">BQ", flags | LONG, n)
    return head + body


def message(frames: list) -> bytes:
    return b"".join(frame(bytes(memoryview(f).cast("B")), i < len(frames) - 1)
                    for i, f in enumerate(frames))


def closed_by_server(s: socket.socket) -> bool:
    """Read (and drop) until the server closes; True then (False if it stays open 30 s)."""
    s.settimeout(30)
    try:
        while s.recv(1 << 16):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def send_until_closed(s: socket.socket, data: bytes, times: int) -> None:
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for _ in range(times):
            s.sendall(data)


def forward(i: int, rows: int = 2) -> list:
    return encode_request("forward", "n.0", [torch.full((rows, H), float(i))], request_id=i)


SMALL = ServingLimits(max_tensors=4, max_bytes=64 * KB, max_elements=16 * KB,
                      max_header_bytes=1 * KB)


def test_a_multipart_message_that_never_ends_is_bounded_and_closed():
    with serving(SMALL) as (rt, fe):
        cap = SMALL.max_header_bytes + SMALL.max_bytes  # per connection, one message
        s = peer(fe.endpoint)
        part = frame(bytes(60 * KB), more=True)
        send_until_closed(s, part, 300)  # 300 parts of 60 KiB, never the last frame
        assert closed_by_server(s)
        s.close()
        wait_for(lambda: fe.stats()["connections"] == 0, what="the connection closed")
        held = rt.held_bytes()
        assert held["peak"] <= cap and held["held"] == 0
        stats = fe.stats()
        assert stats["closed_protocol"] == 1 and stats["partial_bytes"] == 0
        with client(fe) as c:
            assert decode_reply(c.request(forward(1), time.monotonic() + 30)).request_id == 1


def test_too_many_frames_close_the_connection_before_the_last_one():
    with serving(SMALL) as (rt, fe):
        s = peer(fe.endpoint)
        frames = SMALL.max_tensors + 7  # beyond max_tensors + the frontend's slack
        send_until_closed(s, b"".join(frame(b"x" * 10, more=True) for _ in range(frames)), 1)
        assert closed_by_server(s)
        s.close()
        wait_for(lambda: fe.stats()["closed_protocol"] == 1, what="closed for its frames")
        assert rt.held_bytes()["held"] == 0


def test_partial_messages_of_many_peers_stay_under_the_budget():
    body = 60 * KB
    head = b"h" * 100
    fits = 3
    limits = ServingLimits(max_tensors=4, max_bytes=64 * KB, max_elements=16 * KB,
                           max_header_bytes=1 * KB, max_queued_bytes=fits * (body + len(head)))
    with serving(limits) as (rt, fe):
        peers = [peer(fe.endpoint) for _ in range(8)]
        try:
            # each peer: a header frame, then a 60 KiB frame of which only 1 KiB ever comes
            for i, s in enumerate(peers, 1):
                s.sendall(frame(head, more=True) + frame(bytes(KB), announced=body))
                # one peer at a time: each reserves a whole frame at its header, or is refused
                wait_for(lambda i=i: rt.held_bytes()["held"] == min(i, fits) * (body + len(head))
                         and rt.held_bytes()["refused"] == max(0, i - fits),
                         what=f"peer {i} held or refused")
            held = rt.held_bytes()
            assert held["held"] == fits * (body + len(head)) == limits.max_queued_bytes
            assert held["peak"] <= limits.max_queued_bytes
            # while the budget is taken, a whole request is refused with a typed error
            with client(fe) as c, pytest.raises(OverloadedError):
                decode_reply(c.request(forward(5), time.monotonic() + 30))
        finally:
            for s in peers:
                s.close()
        wait_for(lambda: rt.held_bytes()["held"] == 0, what="partial messages given back")
        with client(fe) as c:
            assert decode_reply(c.request(forward(6), time.monotonic() + 30)).request_id == 6
        assert rt.held_bytes()["peak"] <= limits.max_queued_bytes


def test_connections_beyond_the_cap_are_refused_when_none_is_idle():
    with serving(SMALL, max_connections=4) as (_rt, fe):
        busy = [peer(fe.endpoint) for _ in range(4)]
        try:
            for s in busy:  # half a message each: not idle
                s.sendall(frame(b"h" * 10, more=True))
            wait_for(lambda: fe.stats()["partial_bytes"] == 40, what="4 partial messages")
            extra = connect(fe.endpoint)
            assert closed_by_server(extra)
            extra.close()
            assert fe.stats()["refused_connections"] >= 1
            assert fe.stats()["connections"] == 4
        finally:
            for s in busy:
                s.close()


def test_the_oldest_idle_connection_makes_room_for_a_new_one():
    with serving(SMALL, max_connections=4) as (_rt, fe):
        idle = [peer(fe.endpoint) for _ in range(4)]
        try:
            for s in idle:  # a PING answered: the server has read this peer's READY, in order
                ping(s)
            with client(fe) as c:
                assert decode_reply(c.request(forward(2), time.monotonic() + 30)).request_id == 2
            assert closed_by_server(idle[0])  # the oldest went
            stats = fe.stats()
            assert stats["evicted"] >= 1 and stats["connections"] <= 4
        finally:
            for s in idle:
                s.close()


def test_pyzmq_dealer_req_and_our_client_all_get_their_replies():
    with serving(SMALL) as (_rt, fe):
        ctx = zmq.Context.instance()
        dealer = ctx.socket(zmq.DEALER)
        req = ctx.socket(zmq.REQ)
        try:
            for sock in (dealer, req):
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(fe.endpoint)
            for i, sock in enumerate((dealer, req, dealer)):
                sock.send_multipart(forward(10 + i))
                assert sock.poll(30_000), "no reply"
                reply = decode_reply(sock.recv_multipart())
                assert reply.request_id == 10 + i and reply.tensors[0].shape == (2, H)
                assert float(reply.tensors[0][0, 0]) == 10 + i
        finally:
            dealer.close()
            req.close()
        with client(fe) as c:
            for i in range(3):  # several requests on one connection
                reply = decode_reply(c.request(forward(20 + i), time.monotonic() + 30))
                assert reply.request_id == 20 + i


GARBAGE = [
    ("random greeting", lambda: bytes(range(7, 71))),
    ("ZMTP 2", lambda: GREETING[:10] + b"\x01" + GREETING[11:]),
    ("CURVE", lambda: GREETING[:12] + b"CURVE".ljust(20, b"\0") + GREETING[32:]),
    ("message before READY", lambda: GREETING + frame(b"hello")),
    ("not READY", lambda: GREETING + bytes((0x04, 6)) + b"\x05HELLO"),
    ("PUB peer", lambda: GREETING + ready_command(b"PUB")),
    ("bad flags", lambda: GREETING + ready_command(b"DEALER") + bytes((0xF0, 1)) + b"x"),
    ("huge frame", lambda: GREETING + ready_command(b"DEALER") + struct.pack(">BQ", LONG, 2**62)),
    ("huge command", lambda: GREETING + struct.pack(">BQ", 0x04 | LONG, 2**40)),
]


@pytest.mark.parametrize(("name", "make"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_garbage_closes_the_connection_and_the_server_goes_on(name, make):
    with serving(SMALL) as (rt, fe):
        s = connect(fe.endpoint)
        send_until_closed(s, make(), 1)
        assert closed_by_server(s)
        s.close()
        wait_for(lambda: fe.stats()["closed_protocol"] == 1, what="closed for garbage")
        assert rt.held_bytes()["held"] == 0
        with client(fe) as c:
            assert decode_reply(c.request(forward(3), time.monotonic() + 30)).request_id == 3


def test_a_silent_connection_is_closed_after_the_handshake_deadline():
    with serving(SMALL, handshake_timeout_s=0.2) as (_rt, fe):
        s = connect(fe.endpoint)  # connects, never greets
        assert closed_by_server(s)
        s.close()
        assert fe.stats()["closed_timeout"] == 1


def test_a_peer_that_never_reads_its_replies_is_disconnected():
    rows = 64  # 64 KiB replies
    limits = ServingLimits(max_tensors=4, max_bytes=rows * H * 4, max_elements=rows * H)
    with serving(limits, max_pending_reply_bytes=1 << 20) as (rt, fe):
        s = peer(fe.endpoint, rcvbuf=4096)
        request = message(forward(4, rows))
        send_until_closed(s, request, 2000)  # ~128 MiB of replies asked for, none read
        wait_for(lambda: fe.stats()["closed_slow_reader"] == 1, 60, "slow reader closed")
        s.close()
        stats = fe.stats()
        assert stats["pending_reply_bytes"] == 0 and stats["connections"] == 0
        wait_for(lambda: rt.held_bytes()["held"] == 0, what="requests given back")


def ping(s: socket.socket) -> None:
    s.sendall(bytes((0x04, 9)) + b"\x04PING" + b"\x00\x0a" + b"ab")
    assert recv_exact(s, 9) == bytes((0x04, 7)) + b"\x04PONG" + b"ab"


def test_ping_is_answered_with_pong():
    with serving(SMALL) as (_rt, fe):
        s = peer(fe.endpoint)
        ping(s)
        s.sendall(message(forward(7)))
        head = recv_exact(s, 2)
        assert head[0] & MORE  # the reply's header frame
        s.close()

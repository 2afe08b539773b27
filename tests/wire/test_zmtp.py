"""``ZmtpConnection`` against a real libzmq ROUTER (interoperability) and against scripted
TCP peers that break the protocol (each failure is a typed error, bounded in time and
memory)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import zmq

from tests.runtime.servers import wait_for
from volunteer.wire.zmtp import (
    COMMAND,
    GREETING,
    LONG,
    MORE,
    ZmtpConnection,
    ZmtpError,
    ZmtpTimeout,
    parse_properties,
)

pytestmark = pytest.mark.timeout(30)


def deadline(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


@contextlib.contextmanager
def libzmq_router(echo_prefix: bytes = b"", port: int = 0) -> Iterator[int]:
    """A pyzmq ROUTER on loopback (``port`` 0: any) that answers each message with
    ``prefix`` + its frames."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    if port:
        sock.bind(f"tcp://127.0.0.1:{port}")
    else:
        port = sock.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve() -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(20):
                ident, *frames = sock.recv_multipart()
                sock.send_multipart([ident, *([echo_prefix] if echo_prefix else []), *frames])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join(5)
        sock.close()
        ctx.term()


def command(name: bytes, data: bytes = b"") -> bytes:
    body = bytes([len(name)]) + name + data
    return bytes([COMMAND, len(body)]) + body


def ready(socket_type: bytes) -> bytes:
    return command(b"READY", b"\x0bSocket-Type" + struct.pack(">I", len(socket_type)) + socket_type)


def recv_exact(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise ConnectionError("client went away")
        out += chunk
    return out


def handshake(conn: socket.socket) -> None:
    """The server side of a NULL handshake, done by hand."""
    conn.sendall(GREETING[:32] + b"\x01" + GREETING[33:])
    assert recv_exact(conn, 64)[:10] == GREETING[:10]
    conn.sendall(ready(b"ROUTER"))
    flags, size = recv_exact(conn, 2)
    assert flags == COMMAND and recv_exact(conn, size).startswith(b"\x05READY")


def read_message(conn: socket.socket) -> list[bytes]:
    frames = []
    while True:
        flags = recv_exact(conn, 1)[0]
        size = struct.unpack(">Q", recv_exact(conn, 8))[0] if flags & LONG else recv_exact(conn, 1)[0]
        frames.append(recv_exact(conn, size))
        if not flags & MORE:
            return frames


@contextlib.contextmanager
def scripted_peer(script: Callable[[socket.socket], None]) -> Iterator[int]:
    """A TCP listener on loopback whose connections are handled by ``script``."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)  # accept() wakes up to see ``done``
    port = listener.getsockname()[1]
    conns: list[socket.socket] = []
    done = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            while not done.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                conn.settimeout(None)
                conns.append(conn)
                with contextlib.suppress(OSError, ConnectionError, AssertionError):
                    script(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        done.set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)  # wakes a script blocked on it
        thread.join(5)
        listener.close()
        for c in conns:
            c.close()
        assert not thread.is_alive()


def test_talks_to_a_libzmq_router_and_keeps_frames_apart():
    with libzmq_router(echo_prefix=b"hdr") as port:
        conn = ZmtpConnection("127.0.0.1", port, deadline())
        try:
            assert conn.peer_properties["Socket-Type"] == b"ROUTER"
            for i in range(20):  # the connection is reused message after message
                payload = bytes([i]) * (300 + i)  # > 255 bytes: a long frame
                reply = conn.request([b"a", b"", payload, memoryview(b"xyz")], deadline())
                assert reply == [b"hdr", b"a", b"", payload, b"xyz"]
                assert all(isinstance(f, bytearray) for f in reply)  # writable: tensors wrap them
        finally:
            conn.close()


def test_large_messages_cross_in_both_directions():
    big = bytes(range(256)) * (12 * 4096)  # 12 MiB: several partial sends and reads
    with libzmq_router() as port:
        conn = ZmtpConnection("127.0.0.1", port, deadline())
        try:
            reply = conn.request([b"h", memoryview(big)], deadline(20))
            assert len(reply) == 2 and reply[0] == b"h" and reply[1] == big
            # received in place into a buffer of its own (not zero-filled first), writable
            assert isinstance(reply[1], memoryview) and not reply[1].readonly
            assert reply[1].nbytes == len(big)
        finally:
            conn.close()


def test_answers_a_ping_and_still_gets_the_reply():
    pongs: list[bytes] = []

    def script(conn: socket.socket) -> None:
        handshake(conn)
        request = read_message(conn)
        conn.sendall(command(b"PING", b"\x00\x0actx42"))
        _, size = recv_exact(conn, 2)
        pongs.append(recv_exact(conn, size))
        conn.sendall(bytes([0, len(request[0])]) + request[0])

    with scripted_peer(script) as port:
        conn = ZmtpConnection("127.0.0.1", port, deadline())
        try:
            assert conn.request([b"hello"], deadline()) == [b"hello"]
        finally:
            conn.close()
    assert pongs == [b"\x04PONGctx42"]


def _greeting_with(**changes: bytes) -> bytes:
    g = bytearray(GREETING)
    if "signature" in changes:
        g[0:10] = changes["signature"]
    if "version" in changes:
        g[10:12] = changes["version"]
    if "mechanism" in changes:
        g[12:32] = changes["mechanism"].ljust(20, b"\x00")
    return bytes(g)


@pytest.mark.parametrize(
    "peer_sends, message",
    [
        (b"HTTP/1.1 400 Bad Request\r\n" + b"x" * 64, "not a ZeroMQ socket"),
        (_greeting_with(version=b"\x02\x00"), r"ZMTP 2\.0"),
        (_greeting_with(mechanism=b"CURVE"), "CURVE security"),
        (GREETING + bytes([0, 2]) + b"hi", "before its READY"),
        (GREETING + command(b"ERROR", b"\x0bnot welcome"), "refused the handshake: not welcome"),
        (GREETING + command(b"HELLO"), "expected a READY"),
        (GREETING + ready(b"PUB"), "PUB socket; a ROUTER is needed"),
        (GREETING + command(b"READY", b"\x0bSocket-Type\xff\xff\xff\xffROUTER"), "malformed metadata"),
        (GREETING + bytes([COMMAND | LONG]) + struct.pack(">Q", 2**62), "frame of"),
        (GREETING[:20], "closed by the peer"),
    ],
    ids=["http", "zmtp2", "curve", "message-first", "error", "hello", "pub", "metadata", "huge", "eof"],
)
def test_a_broken_handshake_is_a_typed_error(peer_sends: bytes, message: str):
    def script(conn: socket.socket) -> None:
        conn.sendall(peer_sends)
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)  # EOF after the script: never a hang
        with contextlib.suppress(OSError):
            recv_exact(conn, 1 << 20)

    with scripted_peer(script) as port, pytest.raises(ZmtpError, match=message):
        ZmtpConnection("127.0.0.1", port, deadline(), max_reply_bytes=1 << 20)


@pytest.mark.parametrize(
    "reply, message",
    [
        (bytes([LONG]) + struct.pack(">Q", 2**40), r"frame of 1099511627776 bytes"),
        (bytes([0x10, 1]) + b"x", "bad ZMTP frame flags"),
        (bytes([MORE, 1]) + b"x", "closed by the peer"),
        (b"".join(bytes([MORE, 1]) + b"x" for _ in range(300)), "more than 256 frames"),
        (command(b"ERROR", b"\x04boom"), "reported an error"),
    ],
    ids=["huge-frame", "reserved-flags", "eof-mid-message", "too-many-frames", "error-command"],
)
def test_a_broken_reply_is_a_typed_error(reply: bytes, message: str):
    def script(conn: socket.socket) -> None:
        handshake(conn)
        read_message(conn)
        conn.sendall(reply)
        conn.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            recv_exact(conn, 1 << 20)

    with scripted_peer(script) as port:
        conn = ZmtpConnection("127.0.0.1", port, deadline(), max_reply_bytes=1 << 20)
        try:
            with pytest.raises(ZmtpError, match=message):
                conn.request([b"q"], deadline())
        finally:
            conn.close()


@pytest.mark.parametrize("spin_s", [0.0, 200e-6])
def test_no_reply_times_out_at_the_deadline(spin_s: float):
    release = threading.Event()

    def script(conn: socket.socket) -> None:
        handshake(conn)
        read_message(conn)
        release.wait(10)  # never answers while the client waits

    with scripted_peer(script) as port:
        conn = ZmtpConnection("127.0.0.1", port, deadline(), spin_s=spin_s)
        try:
            start = time.monotonic()
            with pytest.raises(ZmtpTimeout):
                conn.request([b"q"], time.monotonic() + 0.3)
            assert 0.29 <= time.monotonic() - start < 2.0
        finally:
            release.set()
            conn.close()


def test_a_silent_listener_times_out_the_handshake():
    with scripted_peer(lambda conn: recv_exact(conn, 1 << 20)) as port:  # reads, never greets
        start = time.monotonic()
        with pytest.raises(ZmtpTimeout):
            ZmtpConnection("127.0.0.1", port, time.monotonic() + 0.3)
        assert time.monotonic() - start < 1.5


def test_nothing_listening_is_a_typed_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ZmtpError, match="refused"):
        ZmtpConnection("127.0.0.1", port, deadline())


def test_an_idle_connection_closed_by_the_server_is_stale():
    with libzmq_router() as port:
        conn = ZmtpConnection("127.0.0.1", port, deadline())
        assert conn.request([b"x"], deadline()) == [b"x"] and not conn.stale()
    # the router is gone: its end of the connection was closed
    wait_for(conn.stale, what="the closed connection to look stale")
    conn.close()


def test_metadata_parsing():
    data = b"\x0bSocket-Type\x00\x00\x00\x06ROUTER\x08Identity\x00\x00\x00\x00"
    assert parse_properties(data) == {"Socket-Type": b"ROUTER", "Identity": b""}
    for bad in (b"\x00", b"\x05ab", b"\x02ab\x00\x00\x00\x09xy"):
        with pytest.raises(ZmtpError):
            parse_properties(bad)

"""Fuzzing the ZMTP reader (``volunteer.wire.zmtp``) from a real TCP peer on loopback.

A scripted server accepts each connection, writes the example's bytes, then half-closes
(FIN), so every read ends in data or EOF and no example waits for a deadline. Property:
``ZmtpConnection`` (handshake, then ``recv`` until the stream ends) only ever raises
``ZmtpError`` or ``ZmtpTimeout``, and every message it returns respects ``max_frames`` and
``max_reply_bytes``. ``parse_properties`` (the READY metadata parser) is fuzzed directly:
``ZmtpError`` or a dict whose values fit in the input.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.profile import fuzz_settings
from tests.fuzz.strategies import mutated
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

pytestmark = pytest.mark.timeout(180)

MAX_REPLY_BYTES = 1024
MAX_FRAMES = 4
SERVER_GREETING = GREETING[:32] + b"\x01" + GREETING[33:]  # as-server flag set


def command(name: bytes, data: bytes = b"") -> bytes:
    body = bytes([len(name)]) + name + data
    return bytes([COMMAND, len(body)]) + body


def ready(socket_type: bytes) -> bytes:
    return command(b"READY", b"\x0bSocket-Type" + struct.pack(">I", len(socket_type)) + socket_type)


VALID_PREAMBLE = SERVER_GREETING + ready(b"ROUTER")
READY_DEALER = ready(b"DEALER")


class ScriptedPeer:
    """A loopback listener: each accepted connection gets the next queued payload, then FIN."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.payloads: queue.Queue[bytes | None] = queue.Queue()
        self.drained: queue.Queue[int] = queue.Queue()  # bytes each client sent, in order
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            payload = self.payloads.get()
            if payload is None:
                return
            conn, _ = self.listener.accept()
            with conn, contextlib.suppress(OSError):
                conn.settimeout(10.0)
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)
                got = 0
                while chunk := conn.recv(65536):  # until the client closes (PONGs etc.)
                    got += len(chunk)
                self.drained.put(got)

    def close(self) -> None:
        self.payloads.put(None)
        self.thread.join(10)
        self.listener.close()
        assert not self.thread.is_alive()


@contextlib.contextmanager
def scripted_peer() -> Iterator[ScriptedPeer]:
    peer = ScriptedPeer()
    try:
        yield peer
    finally:
        peer.close()


PEER: ScriptedPeer | None = None


@pytest.fixture(scope="module", autouse=True)
def _peer() -> Iterator[None]:
    global PEER
    with scripted_peer() as peer:
        PEER = peer
        yield
    PEER = None


def talk_to(payload: bytes) -> None:
    """Connect to a peer that sends ``payload``; read messages until the stream ends."""
    assert PEER is not None
    PEER.payloads.put(payload)
    deadline = time.monotonic() + 20.0
    try:
        conn = ZmtpConnection("127.0.0.1", PEER.port, deadline, max_reply_bytes=MAX_REPLY_BYTES,
                              max_frames=MAX_FRAMES)
    except (ZmtpError, ZmtpTimeout):
        return
    try:
        assert isinstance(conn.peer_properties, dict)
        conn.send([b"", b"hello"], deadline)
        for _ in range(len(payload) + 1):  # each message consumes >= 1 byte: bounded loop
            try:
                frames = conn.recv(deadline)
            except (ZmtpError, ZmtpTimeout):
                return
            assert 1 <= len(frames) <= MAX_FRAMES
            assert sum(len(f) for f in frames) <= MAX_REPLY_BYTES
        raise AssertionError("recv kept returning messages after the stream ended")
    finally:
        conn.close()


@st.composite
def zmtp_frames(draw: st.DrawFn) -> bytes:
    """Frames with plausible headers: flags (MORE, LONG, COMMAND, reserved bits), sizes that
    may lie about the body, PING/ERROR/unknown commands and malformed command bodies."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(("data", "data", "command", "raw")))
        if kind == "raw":
            out += draw(st.binary(max_size=12))
            continue
        if kind == "command":
            name = draw(st.sampled_from((b"PING", b"PONG", b"ERROR", b"READY", b"SUBSCRIBE", b"")))
            body = bytes([draw(st.integers(0, 255))]) + name + draw(st.binary(max_size=24))
            flags = COMMAND
        else:
            body = draw(st.binary(max_size=80))
            flags = draw(st.sampled_from((0, MORE, MORE, 0x08, 0x80)))
        size = len(body) + draw(st.sampled_from((0, 0, 0, -1, 1, 2**20, 2**63)))
        size = max(0, size)
        if size < 256 and draw(st.integers(0, 5)) != 0:
            out += bytes([flags, size])
        else:
            out += bytes([flags | LONG]) + struct.pack(">Q", min(size, 2**64 - 1))
        out += body
    return bytes(out)


@fuzz_settings(0.5)
@given(st.binary(max_size=160))
def test_zmtp_reader_on_random_bytes(payload: bytes) -> None:
    talk_to(payload)


@fuzz_settings(0.5)
@given(st.data())
def test_zmtp_reader_on_mutated_handshakes(data: st.DataObject) -> None:
    talk_to(data.draw(mutated(VALID_PREAMBLE)) + data.draw(zmtp_frames()))


@fuzz_settings()
@given(zmtp_frames())
def test_zmtp_reader_on_hostile_frames_after_a_valid_handshake(frames: bytes) -> None:
    talk_to(VALID_PREAMBLE + frames)


def test_a_message_of_more_frames_than_sendmsg_takes_at_once_is_sent_whole() -> None:
    """sendmsg() refuses more than IOV_MAX (1024) buffers with EMSGSIZE: a message of 3000
    frames (6000 parts) must still go out, in batches, byte for byte."""
    frames = [bytes([i % 251]) * (i % 300) for i in range(3000)]
    expected = sum(len(f) + (2 if len(f) < 256 else 9) for f in frames)
    with scripted_peer() as peer:  # its own peer: ``drained`` holds this connection only
        peer.payloads.put(VALID_PREAMBLE)
        deadline = time.monotonic() + 20.0
        conn = ZmtpConnection("127.0.0.1", peer.port, deadline)
        try:
            conn.send(frames, deadline)
        finally:
            conn.close()
        assert peer.drained.get(timeout=20) == len(GREETING) + len(READY_DEALER) + expected


@fuzz_settings()
@given(st.one_of(st.binary(max_size=64),
                 st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=12),
                                    st.integers(-2, 2))).map(
                     lambda items: b"".join(bytes([len(n) % 256]) + n
                                            + struct.pack(">I", max(0, len(v) + d)) + v
                                            for n, v, d in items))))
def test_ready_metadata_parser(data: bytes) -> None:
    try:
        props = parse_properties(data)
    except ZmtpError:
        return
    assert sum(len(k) + len(v) for k, v in props.items()) <= len(data)

"""``ZmtpConn``: the server side of one ZMTP 3.0 (NULL) connection, parsed byte by byte.

ZeroMQ's wire protocol (RFC 23) as a ROUTER speaks it to DEALER / REQ peers: a 64-byte
greeting each way, a READY command each way, then messages as frames of ``flags, size,
body``. This module holds one connection's parse state and turns the bytes the server read
into frames; ``volunteer.runtime.zmtp_server`` does the socket IO, the timers and the bounds
that span connections. Nothing here allocates before a bound is checked: a frame's size is
checked against ``max_frame_bytes``, the message's frame count against ``max_frames`` and
its bytes against ``max_message_bytes`` and the shared budget (``reserve``) at the frame
header, and only then is the frame's buffer allocated (one buffer of exactly that size,
which the server may ``recv_into`` directly and which the tensor decoder wraps as is).

Frame buffers come from ``alloc(size)`` (``Alloc``), the server's one allocation hook: by
default ``default_alloc`` (a ``bytearray`` for small frames; from ``UNINIT_MIN`` bytes an
uninitialised numpy buffer, since zero-filling 16 MiB costs about as much as receiving it,
and every byte is received before the frame is used); a GPU node passes a function that returns pinned host memory
(any writable, C-contiguous object with the buffer protocol, exactly ``size`` bytes), so
tensors are received straight into memory the device can copy from asynchronously. It is
called for every non-empty frame body (headers too: an allocator that only wants large
frames returns ``bytearray(size)`` below its own threshold), always after the bounds and the
byte budget accepted the frame. A buffer of the wrong size or a read-only one is a bug of
the allocator: ``AllocError``, and the server closes that connection (logged).

A frame the budget refuses is skipped (read and dropped, nothing kept) and the message is
answered with the typed refusal once it ends; a protocol violation raises ``ProtocolError``
and the server closes the connection.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from volunteer.wire.errors import RemoteError, TooLargeError
from volunteer.wire.zmtp import COMMAND, GREETING, LONG, MORE, RESERVED, parse_properties

_SIZE = struct.Struct(">Q")
_PROPERTY_SIZE = struct.Struct(">I")
_EMPTY = memoryview(b"")
PEER_TYPES = (b"DEALER", b"REQ", b"ROUTER")  # what a libzmq ROUTER accepts

GREETING_SENT, HANDSHAKE, READY = 0, 1, 2  # connection states

Alloc = Callable[[int], Any]
"""``alloc(size)`` -> a writable buffer-protocol object of exactly ``size`` bytes."""


class AllocError(Exception):
    """The frame allocator returned something that cannot hold the frame (a bug)."""


UNINIT_MIN = 64 * 1024  # frames from this size get uninitialised memory (no memset)


def default_alloc(size: int) -> bytearray | np.ndarray:
    """The allocation used without a hook: ``bytearray(size)`` below ``UNINIT_MIN`` bytes,
    else ``numpy.empty(size, uint8)`` (not zero-filled: the frame's bytes overwrite all of it
    before anyone reads it; a frame cut short is dropped unread)."""
    return bytearray(size) if size < UNINIT_MIN else np.empty(size, np.uint8)


def _byte_view(buf: object, size: int) -> memoryview:
    """A flat, writable, byte-format view of ``buf``; ``AllocError`` unless ``size`` bytes."""
    try:
        mv = memoryview(buf)  # type: ignore[arg-type]
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")  # TypeError unless C-contiguous
    except TypeError as e:
        raise AllocError(f"frame buffer unusable: {e}") from None
    if mv.readonly or mv.nbytes != size:
        raise AllocError(f"frame buffer of {mv.nbytes} bytes (readonly={mv.readonly}) for a "
                         f"frame of {size}")
    return mv


class ProtocolError(Exception):
    """The peer broke ZMTP or a bound that closes the connection."""


@dataclass(frozen=True)
class ConnLimits:
    """Per-connection bounds (see ``ZmtpServerLimits`` for the server-wide ones)."""

    max_frame_bytes: int
    max_frames: int
    max_message_bytes: int
    max_command_bytes: int = 4096


def ready_command(socket_type: bytes = b"ROUTER") -> bytes:
    """A READY command announcing ``socket_type`` (NULL mechanism metadata)."""
    name = b"Socket-Type"
    body = (b"\x05READY" + bytes([len(name)]) + name
            + _PROPERTY_SIZE.pack(len(socket_type)) + socket_type)
    return bytes([COMMAND, len(body)]) + body


HELLO = GREETING + ready_command()  # what the server sends on accept, at once
_PONG_NAME = b"\x04PONG"


class ZmtpConn:
    """Parse state of one connection. ``feed`` / ``body_view`` are called by the server."""

    __slots__ = (
        "alloc",
        "body",
        "body_mv",
        "command",
        "created",
        "fd",
        "frames",
        "got",
        "greeting",
        "hbuf",
        "inflight",
        "last_active",
        "last_tx",
        "limits",
        "more",
        "msg_bytes",
        "msg_start",
        "nframes",
        "out",
        "out_bytes",
        "peer",
        "pongs",
        "refusal",
        "release",
        "reserve",
        "rx_paused_at",
        "rx_timer",
        "size",
        "skip",
        "sock",
        "state",
        "tx_timer",
        "want_write",
    )

    def __init__(self, sock: object, fd: int, peer: object, limits: ConnLimits,
                 reserve: Callable[[int], RemoteError | None],
                 release: Callable[[int], None], now: float,
                 alloc: Alloc | None = None) -> None:
        self.sock = sock
        self.alloc: Alloc = alloc or default_alloc
        self.fd = fd
        self.peer = peer
        self.limits = limits
        self.reserve = reserve
        self.release = release
        self.state = GREETING_SENT
        self.created = self.last_active = self.last_tx = now
        self.msg_start = 0.0  # when the unfinished message's first byte came (0: none)
        self.inflight = 0  # requests handed over and not answered yet
        self.greeting = bytearray()
        self.hbuf = bytearray()  # a frame header split across reads (<= 9 bytes)
        self.command: bytearray | None = None  # a command's body being read (small)
        self.body: object | None = None  # the current frame's buffer (from ``alloc``)
        self.body_mv: memoryview = _EMPTY
        self.got = self.size = self.skip = 0
        self.more = False
        self.frames: list = []
        self.nframes = 0
        self.msg_bytes = 0  # reserved for the unfinished message (<= max_message_bytes)
        self.refusal: RemoteError | None = None
        self.out: collections.deque = collections.deque()
        self.out_bytes = 0
        self.want_write = False
        self.pongs: list[bytes] = []  # PONG commands to send (the server flushes them)
        # bandwidth caps (``ZmtpServer(traffic=...)``): a loop timer that resumes reading /
        # writing once the bucket has refilled (None: not held back), and when reads paused
        self.rx_timer: list | None = None
        self.tx_timer: list | None = None
        self.rx_paused_at = 0.0

    # -- state --

    def partial(self) -> bool:
        """True while a message (or a frame header) is half read."""
        return bool(self.nframes or self.hbuf or self.body is not None or self.skip
                    or self.command is not None)

    def idle(self) -> bool:
        return not (self.inflight or self.out or self.partial()) or self.state != READY

    def drop_message(self) -> None:
        """Forget the unfinished message and give its reserved bytes back."""
        held, self.msg_bytes = self.msg_bytes, 0
        if held:
            self.release(held)
        self.frames = []
        self.nframes = 0
        self.body = None
        self.body_mv = _EMPTY
        self.got = self.size = self.skip = 0
        self.refusal = None
        self.command = None
        self.msg_start = 0.0

    # -- parsing --

    def feed(self, data: memoryview, n: int, done: Callable) -> None:
        """Consume ``data[:n]``; ``done(conn, frames, held, refusal)`` gets each message.

        Raises ``ProtocolError`` when the peer broke the protocol or a closing bound."""
        pos = 0
        while pos < n and self.sock is not None:  # a handler may have closed the connection
            if self.skip:  # bytes of a refused frame: dropped
                k = min(self.skip, n - pos)
                self.skip -= k
                pos += k
                if not self.skip:
                    self._end_frame(done)
                continue
            body = self.body
            if body is not None:
                k = min(self.size - self.got, n - pos)
                self.body_mv[self.got : self.got + k] = data[pos : pos + k]
                self.got += k
                pos += k
                if self.got == self.size:
                    self._end_frame(done)
                continue
            if self.command is not None:
                cmd = self.command
                k = min(self.size - len(cmd), n - pos)
                cmd += data[pos : pos + k]
                pos += k
                if len(cmd) == self.size:
                    self._end_command()
                continue
            if self.state == GREETING_SENT:
                k = min(64 - len(self.greeting), n - pos)
                self.greeting += data[pos : pos + k]
                pos += k
                if len(self.greeting) == 64:
                    self._check_greeting()
                continue
            hb = self.hbuf
            if not hb and n - pos >= 9:  # the common case: a whole header in this read
                flags = data[pos]
                if flags & LONG:
                    size = _SIZE.unpack_from(data, pos + 1)[0]
                    pos += 9
                else:
                    size = data[pos + 1]
                    pos += 2
                self._start_frame(flags, size, done)
                continue
            need = 9 if hb and hb[0] & LONG else 2
            k = min(need - len(hb), n - pos)
            hb += data[pos : pos + k]
            pos += k
            if len(hb) == 2 and hb[0] & LONG:
                continue  # a long header: 7 more bytes
            if len(hb) == need:
                flags = hb[0]
                size = _SIZE.unpack_from(hb, 1)[0] if flags & LONG else hb[1]
                hb.clear()
                self._start_frame(flags, size, done)

    def body_view(self) -> memoryview | None:
        """Where the rest of the current frame goes, for a direct ``recv_into`` (or None)."""
        if self.body is None:
            return None
        return self.body_mv[self.got :]

    def advance(self, n: int, done: Callable) -> None:
        """``n`` bytes were read straight into ``body_view()``."""
        self.got += n
        if self.got == self.size:
            self._end_frame(done)

    def _check_greeting(self) -> None:
        g = self.greeting
        if g[0] != 0xFF or not g[9] & 0x01:
            raise ProtocolError("not a ZeroMQ peer (bad ZMTP signature)")
        if g[10] < 3:
            raise ProtocolError(f"peer speaks ZMTP {g[10]}; 3.0 or later needed")
        if bytes(g[12:32]).rstrip(b"\x00") != b"NULL":
            raise ProtocolError("peer wants a security mechanism other than NULL")
        self.greeting = bytearray()
        self.state = HANDSHAKE  # greeted, waiting for the peer's READY

    def _start_frame(self, flags: int, size: int, done: Callable) -> None:
        lim = self.limits
        if flags & RESERVED:
            raise ProtocolError(f"bad ZMTP frame flags {flags:#x}")
        if flags & COMMAND:
            if flags & MORE or size == 0 or size > lim.max_command_bytes:
                raise ProtocolError(f"bad ZMTP command ({size} bytes, flags {flags:#x})")
            self.size = size
            self.command = bytearray()
            return
        if self.state != READY:
            raise ProtocolError("message before the READY command")
        self.nframes += 1
        if self.nframes > lim.max_frames:
            raise ProtocolError(f"message of more than {lim.max_frames} frames")
        if size > lim.max_frame_bytes:
            raise ProtocolError(f"frame of {size} bytes > {lim.max_frame_bytes}")
        self.more = bool(flags & MORE)
        if self.refusal is None:
            total = self.msg_bytes + size
            if total > lim.max_message_bytes:
                self.refusal = TooLargeError(
                    f"message of more than {lim.max_message_bytes} bytes")
            else:
                self.refusal = self.reserve(size) if size else None
                if self.refusal is None:
                    self.msg_bytes = total
                    if size:
                        self.body = self.alloc(size)
                        self.body_mv = _byte_view(self.body, size)
                        self.got = 0
                        self.size = size
                        return
                    self.frames.append(_EMPTY)
                    self._end_frame(done)
                    return
        self.skip = size
        if not size:
            self._end_frame(done)

    def _end_frame(self, done: Callable) -> None:
        if self.body is not None:
            self.frames.append(self.body_mv)
            self.body = None
            self.body_mv = _EMPTY
        if self.more:
            return
        frames, held, refusal = self.frames, self.msg_bytes, self.refusal
        self.frames = []
        self.nframes = self.msg_bytes = self.got = self.size = 0
        self.refusal = None
        self.msg_start = 0.0
        self.inflight += 1
        done(self, frames, held, refusal)

    def _end_command(self) -> None:
        body, self.command = self.command, None
        self.size = 0
        n = body[0]
        if n == 0 or 1 + n > len(body):
            raise ProtocolError("malformed ZMTP command")
        name, data = bytes(body[1 : 1 + n]), bytes(body[1 + n :])
        if self.state != READY:
            if name != b"READY":
                raise ProtocolError(f"expected READY, got {name[:16]!r}")
            try:
                kind = parse_properties(data).get("Socket-Type", b"")
            except ConnectionError as e:
                raise ProtocolError(str(e)) from None
            if kind not in PEER_TYPES:
                raise ProtocolError(f"a ROUTER does not talk to a {kind[:16]!r} socket")
            self.state = READY
        elif name == b"PING" and len(data) >= 2:  # heartbeat: answer with its context
            ctx = data[2:18]
            body = _PONG_NAME + ctx
            self.pongs.append(bytes([COMMAND, len(body)]) + body)
        elif name == b"ERROR":
            raise ProtocolError("peer reported an error")

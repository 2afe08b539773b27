"""``ZmtpServer``: a ZeroMQ ROUTER, spoken by the project itself, on a ``ServingLoop``.

libzmq's ROUTER buffers whatever its peers send: it keeps reading the parts of a multipart
message that never ends (no bound on their number) and accepts any number of connections.
This server reads the ZMTP 3.0 (NULL) frames itself, with non-blocking sockets polled by a
``ServingLoop`` (epoll; ``ZmqFrontend`` gives it an IO thread of its own), so every byte it
holds is counted and refused at the frame header that would break a bound:

- **per frame**: ``max_frame_bytes`` (larger: the connection is closed, as libzmq's
  ``MAXMSGSIZE`` did); **per message**: ``max_frames`` frames (more: closed) and
  ``max_message_bytes`` held for one unfinished message (more: the rest is skipped, the
  message is answered ``too_large``);
- **all connections together**: every frame's bytes are reserved against the runtime's
  ``max_queued_bytes`` (``reserve``) when its header arrives, before its buffer is
  allocated, and stay reserved until the request is answered. A frame the budget refuses is
  read and dropped (nothing kept; the socket is drained, so no peer is stalled) and the
  message is answered with the typed refusal (``overloaded``) when it ends. Clients retry
  elsewhere or later, as for every other refusal.
- **connections**: at most ``max_connections``; beyond, the connection idle the longest (no
  request in flight, nothing half read or unsent, or not handshaken yet) is closed for the
  new one, and when none is idle the new one is closed at once. The greeting and READY must
  come within ``handshake_timeout_s``, a message must be complete ``message_timeout_s`` after
  its first byte, a reply that makes no progress for ``stall_timeout_s`` closes the
  connection, and so does ``idle_timeout_s`` without anything.
- **replies**: a connection holds at most ``max_pending_reply_bytes`` of unsent replies
  (one reply of any size is queued when nothing is pending); a peer that does not read them
  is disconnected.

Beyond those: a fixed 256 KiB read buffer shared by all connections, and per connection a
frame-header buffer (<= 9 bytes) and one command (<= 4 KiB). Anything malformed closes the
connection (counted); no exception leaves a handler.

**Bandwidth caps** (``traffic``, a ``volunteer.net.rate_limit.Traffic``; None: no shaping,
and the hot path pays an ``is None`` test per read and write): see
``volunteer.runtime.zmtp_shaping`` (reads and writes held back by loop timers, never a sleep).

Replies are written with ``sendmsg`` straight from the caller's buffers (tensor memory is
never copied); large frame bodies are read with ``recv_into`` into their own preallocated
buffer, small ones through the shared buffer. Every frame body's buffer comes from ``alloc``
(``ZmtpServer(..., alloc=...)``, see ``volunteer.runtime.zmtp_conn``): ``bytearray(size)``
by default, pinned host memory on a GPU node.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from volunteer.net.rate_limit import Traffic
from volunteer.runtime.loop import READ, WRITE, ServingLoop
from volunteer.runtime.zmtp_conn import (
    HELLO,
    READY,
    Alloc,
    ConnLimits,
    ProtocolError,
    ZmtpConn,
)
from volunteer.runtime.zmtp_shaping import ZmtpShaping, take_parts
from volunteer.wire.errors import RemoteError
from volunteer.wire.zmtp import LONG, MORE

log = logging.getLogger(__name__)

SCRATCH = 256 * 1024  # the shared read buffer
DIRECT_MIN = 64 * 1024  # a frame body with at least this much left is read straight into place
READ_BURST = 8 * 2**20  # bytes read from one connection per wake-up (fairness)
ACCEPT_BURST = 64
IOV_MAX = 512
_HANGUP = select.EPOLLHUP | select.EPOLLERR
_LONG_HEADER = struct.Struct(">BQ")

# on_message(conn, frames, held): a complete message; ``held`` bytes stay reserved until the
# handler gives them back (the runtime does, with the reply). on_refused(conn, frames, error):
# a message the bounds refused (its reserved bytes were already given back).
OnMessage = Callable[[ZmtpConn, list, int], None]
OnRefused = Callable[[ZmtpConn, list, RemoteError], None]


@dataclass(frozen=True)
class ZmtpServerLimits:
    """Bounds of a ``ZmtpServer`` (see the module docstring)."""

    max_frame_bytes: int
    max_frames: int
    max_message_bytes: int
    max_connections: int = 512
    max_pending_reply_bytes: int = 64 * 2**20
    handshake_timeout_s: float = 10.0
    message_timeout_s: float = 120.0
    stall_timeout_s: float = 60.0
    idle_timeout_s: float = 900.0


class ZmtpServer(ZmtpShaping):
    """ROUTER semantics on one listening TCP socket; everything runs in ``loop``'s thread
    except ``bind`` (before ``attach``) and ``close`` once the loop is gone.

    ``alloc(size)`` allocates every frame body (default ``bytearray(size)``); it runs in the
    loop's thread, after the frame's bytes were reserved. ``traffic`` caps and counts the
    bytes (see the module docstring); None, the default, shapes nothing."""

    def __init__(self, loop: ServingLoop, limits: ZmtpServerLimits,
                 reserve: Callable[[int], RemoteError | None], release: Callable[[int], None],
                 on_message: OnMessage, on_refused: OnRefused, alloc: Alloc | None = None,
                 traffic: Traffic | None = None) -> None:
        self.loop = loop
        self.traffic = traffic
        self._alloc = alloc
        self.limits = limits
        self._conn_limits = ConnLimits(limits.max_frame_bytes, limits.max_frames,
                                       limits.max_message_bytes)
        self._reserve = reserve
        self._release = release
        self._on_message = on_message
        self._on_refused = on_refused
        self._listener: socket.socket | None = None
        self._conns: dict[int, ZmtpConn] = {}
        self._scratch = bytearray(SCRATCH)
        self._scratch_mv = memoryview(self._scratch)
        self._timer: list | None = None
        self._accept_paused = False
        self.counters = dict.fromkeys(
            ("accepted", "refused_connections", "evicted", "messages", "refused_messages",
             "closed_protocol", "closed_timeout", "closed_slow_reader", "closed_by_peer"), 0)

    # -- setup (any thread, before attach) --

    def bind(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (0: any free port); returns the bound address."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(min(socket.SOMAXCONN, 1024))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        addr = sock.getsockname()
        return addr[0], addr[1]

    def attach(self) -> None:
        """Start accepting (loop thread; e.g. through ``loop.call_soon``)."""
        if self._listener is None:
            return
        self.loop.register(self._listener.fileno(), READ, self._on_accept)
        self.loop.on_exit(self.close)
        lim = self.limits
        tick = min(1.0, lim.handshake_timeout_s, lim.message_timeout_s, lim.stall_timeout_s,
                   lim.idle_timeout_s) / 2
        self._timer = self.loop.every(tick, self._check_deadlines)

    def close(self) -> None:
        """Stop listening and close every connection (loop thread, or after the loop exited)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            self.loop.unregister(listener.fileno())
            listener.close()
        if self._timer is not None:
            self.loop.cancel(self._timer)
            self._timer = None
        self.loop.remove_exit_hook(self.close)
        for conn in list(self._conns.values()):
            self._close(conn, None)

    def stats(self) -> dict[str, int]:
        """Counters, connections open and bytes held by unfinished messages (loop thread)."""
        out = dict(self.counters)
        out["connections"] = len(self._conns)
        out["partial_bytes"] = sum(c.msg_bytes for c in self._conns.values())
        out["pending_reply_bytes"] = sum(c.out_bytes for c in self._conns.values())
        return out

    # -- accepting --

    def _on_accept(self, events: int) -> None:
        listener = self._listener
        if listener is None:
            return
        for _ in range(ACCEPT_BURST):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. out of descriptors: pause accepting until the next tick
                log.warning("accept failed: %s; pausing accepts", e)
                self.loop.modify(listener.fileno(), 0)
                self._accept_paused = True
                return
            if len(self._conns) >= self.limits.max_connections and not self._evict():
                self.counters["refused_connections"] += 1
                sock.close()
                continue
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                sock.close()
                continue
            fd = sock.fileno()
            conn = ZmtpConn(sock, fd, peer, self._conn_limits, self._reserve, self._release,
                            time.monotonic(), self._alloc)
            self._conns[fd] = conn
            self.counters["accepted"] += 1
            self.loop.register(fd, READ, lambda ev, c=conn: self._on_event(c, ev))
            self._queue(conn, [HELLO], len(HELLO))

    def _evict(self) -> bool:
        """Close the connection idle the longest, if one is idle; True when one was closed."""
        idle = [c for c in self._conns.values() if c.idle()]
        if not idle:
            return False
        victim = min(idle, key=lambda c: (c.state == READY, c.last_active))
        self.counters["evicted"] += 1
        self._close(victim, None)
        return True

    # -- reading --

    def _on_event(self, conn: ZmtpConn, events: int) -> None:
        if events & WRITE:
            self._flush(conn)
        if events & ~WRITE and conn.sock is not None:
            if conn.rx_timer is not None:  # reads held back by the download cap
                if events & _HANGUP:
                    self.counters["closed_by_peer"] += 1
                    self._close(conn, "peer hung up")
                return
            self._read(conn)

    def _read(self, conn: ZmtpConn) -> None:
        sock = conn.sock
        scratch = self._scratch_mv
        traffic = self.traffic
        left = READ_BURST
        if traffic is not None and traffic.down is not None:
            left = min(READ_BURST, self._allowance(conn, traffic.down, True))
        try:
            while left > 0 and conn.sock is not None:
                direct = conn.body_view()
                if direct is not None and len(direct) >= DIRECT_MIN:
                    if traffic is not None and len(direct) > left:
                        direct = direct[:left]
                    n = sock.recv_into(direct)
                    if n == 0:
                        raise EOFError
                    if traffic is not None:
                        traffic.received(n)
                    conn.advance(n, self._done)
                    drained = n < len(direct)
                else:
                    buf = scratch if traffic is None or left >= SCRATCH else scratch[:left]
                    n = sock.recv_into(buf)
                    if n == 0:
                        raise EOFError
                    if traffic is not None:
                        traffic.received(n)
                    conn.feed(scratch, n, self._done)
                    drained = n < len(buf)
                left -= n
                if conn.pongs and conn.sock is not None:
                    pongs, conn.pongs = conn.pongs, []
                    self._queue(conn, pongs, sum(map(len, pongs)))
                if drained:
                    break  # the socket is (most likely) empty; epoll says if not
        except (BlockingIOError, InterruptedError):
            pass
        except EOFError:
            self.counters["closed_by_peer"] += 1
            self._close(conn, None)
            return
        except ProtocolError as e:
            self.counters["closed_protocol"] += 1
            self._close(conn, f"protocol: {e}")
            return
        except OSError as e:
            self.counters["closed_by_peer"] += 1
            self._close(conn, f"socket: {e}")
            return
        except Exception:  # a bug here must cost one connection, never the server
            log.exception("closing a ZMTP connection after an unexpected error")
            self.counters["closed_protocol"] += 1
            self._close(conn, "internal error")
            return
        if conn.sock is not None:
            now = time.monotonic()
            conn.last_active = now
            if conn.msg_start == 0.0 and conn.partial():
                conn.msg_start = now

    def _done(self, conn: ZmtpConn, frames: list, held: int, refusal: RemoteError | None) -> None:
        if refusal is not None:
            if held:
                self._release(held)
            self.counters["refused_messages"] += 1
            self._on_refused(conn, frames, refusal)
        else:
            self.counters["messages"] += 1
            self._on_message(conn, frames, held)

    # -- writing --

    def send(self, conn: ZmtpConn, frames: list) -> None:
        """Queue one reply message on ``conn`` (loop thread); dropped if it closed."""
        if conn.sock is None:
            return
        if conn.inflight:
            conn.inflight -= 1
        parts: list = []
        total = 0
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            n = frame.nbytes if type(frame) is memoryview else len(frame)
            more = MORE if i < last else 0
            head = bytes((more, n)) if n < 256 else _LONG_HEADER.pack(more | LONG, n)
            parts.append(head)
            if n:
                parts.append(frame)
            total += n + len(head)
        if conn.out and conn.out_bytes + total > self.limits.max_pending_reply_bytes:
            self.counters["closed_slow_reader"] += 1
            self._close(conn, "peer does not read its replies")
            return
        self._queue(conn, parts, total)

    def _queue(self, conn: ZmtpConn, parts: list, total: int) -> None:
        was_empty = not conn.out
        conn.out.extend(parts)
        conn.out_bytes += total
        if was_empty:
            conn.last_tx = time.monotonic()
        if not conn.want_write:
            self._flush(conn)

    def _flush(self, conn: ZmtpConn) -> None:
        out = conn.out
        sock = conn.sock
        if sock is None:
            return
        traffic = self.traffic
        if traffic is not None and conn.tx_timer is not None:
            return  # held back by the upload cap: the timer flushes
        while out:
            if traffic is not None and traffic.up is not None:
                limit = self._allowance(conn, traffic.up, False)
                if not limit:
                    break
                batch = take_parts(out, limit, IOV_MAX)
            else:
                batch = list(itertools.islice(out, IOV_MAX)) if len(out) > IOV_MAX else list(out)
            try:
                sent = sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.counters["closed_by_peer"] += 1
                self._close(conn, f"send: {e}")
                return
            if traffic is not None:
                traffic.sent(sent)
            conn.out_bytes -= sent
            conn.last_tx = time.monotonic()
            while sent:
                head = out[0]
                n = head.nbytes if type(head) is memoryview else len(head)
                if sent < n:  # keep the unsent tail of a partly sent part
                    out[0] = _bytes_view(head)[sent:]
                    break
                sent -= n
                out.popleft()
        want = bool(out) and conn.tx_timer is None
        if want != conn.want_write:
            conn.want_write = want
            self._set_mask(conn)

    # -- deadlines and closing --

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        lim = self.limits
        if self._accept_paused and self._listener is not None:
            self._accept_paused = False
            self.loop.modify(self._listener.fileno(), READ)
        for conn in list(self._conns.values()):
            why = None
            if conn.state != READY and now - conn.created > lim.handshake_timeout_s:
                why = "no handshake in time"
            elif (conn.msg_start and conn.rx_timer is None
                  and now - conn.msg_start > lim.message_timeout_s):
                why = "message not finished in time"
            elif conn.out and conn.tx_timer is None and now - conn.last_tx > lim.stall_timeout_s:
                why = "replies not read in time"
            elif conn.idle() and now - conn.last_active > lim.idle_timeout_s:
                why = "idle"
            if why is not None:
                self.counters["closed_timeout"] += 1
                self._close(conn, why)

    def _close(self, conn: ZmtpConn, why: str | None) -> None:
        sock = conn.sock
        if sock is None:
            return
        if why:
            log.debug("closing ZMTP connection from %s: %s", conn.peer, why)
        conn.sock = None
        for timer in (conn.rx_timer, conn.tx_timer):
            if timer is not None:
                self.loop.cancel(timer)
        conn.rx_timer = conn.tx_timer = None
        self._conns.pop(conn.fd, None)
        self.loop.unregister(conn.fd)
        with contextlib.suppress(OSError):
            sock.close()
        conn.drop_message()
        conn.out.clear()
        conn.out_bytes = 0
        conn.inflight = 0


def _bytes_view(part: object) -> memoryview:
    mv = part if type(part) is memoryview else memoryview(part)  # type: ignore[arg-type]
    return mv if mv.ndim == 1 and mv.format == "B" else mv.cast("B")

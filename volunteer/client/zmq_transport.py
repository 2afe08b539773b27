"""``ZmqTransport``: the ``Transport`` for servers reachable over TCP (a ZmqFrontend).

A pool of DEALER sockets: each request borrows an idle socket (or opens one), sends, polls
for the reply with the call's timeout, and returns the socket; so calls from many threads
run in parallel and sockets are reused. A socket whose request timed out is closed rather
than returned (a late reply must never be read as the answer to a later request), which
keeps the transport ignorant of the frames it carries. ``ZMQ_IMMEDIATE`` makes a send wait
for an established connection: no connection within ``connect_timeout`` means
``UnreachableError``; no reply within ``timeout`` means ``RemoteTimeoutError``.

Latency: a call is one non-blocking send and one blocking receive bounded by
``ZMQ_RCVTIMEO`` (set only when the timeout changes), with the frames read one by one
(``Frame.more``): no ``Poller`` per call and no extra option reads, which matters for
sub-millisecond round trips where Python overhead is most of the cost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import zmq

from volunteer.wire.errors import RemoteTimeoutError, UnreachableError

Frame = bytes | memoryview
COPY_THRESHOLD = (
    512 * 1024
)  # smaller frames are copied on send: cheaper than pyzmq's zero-copy path
# plain ints: pyzmq's flag enums cost an enum construction per ``|`` on the hot path
_NOBLOCK = int(zmq.NOBLOCK)
_SEND_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


def _send(sock: zmq.Socket, frames: Sequence[Frame]) -> None:
    """Send a multipart message without blocking (``zmq.Again`` if it cannot go now: only the
    first part can be refused, a multipart message is queued whole or not at all)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, _SEND_MORE if i < last else _NOBLOCK, copy=False)


class ZmqTransport:
    """Thread-safe request/reply to one ``tcp://host:port`` endpoint."""

    def __init__(
        self,
        endpoint: str,
        connect_timeout: float = 5.0,
        max_idle_sockets: int = 64,
        max_reply_bytes: int = 512 * 2**20,
        context: zmq.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.connect_timeout = connect_timeout
        self.max_idle_sockets = max_idle_sockets
        self.max_reply_bytes = max_reply_bytes
        self._context = context or zmq.Context.instance()
        self._idle: list[zmq.Socket] = []
        self._rcvtimeo: dict[zmq.Socket, int] = {}  # last RCVTIMEO set per pooled socket
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"ZmqTransport({self.endpoint!r})"

    def _acquire(self) -> zmq.Socket:
        with self._lock:
            if self._closed:
                raise UnreachableError(f"transport to {self.endpoint} is closed")
            if self._idle:
                return self._idle.pop()
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_reply_bytes)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.copy_threshold = COPY_THRESHOLD
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as e:
            sock.close()
            raise UnreachableError(f"bad endpoint {self.endpoint!r}: {e}") from None
        return sock

    def _release(self, sock: zmq.Socket) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.max_idle_sockets:
                self._idle.append(sock)
                return
            self._rcvtimeo.pop(sock, None)
        sock.close(linger=0)

    def request(self, frames: Sequence[Frame], timeout: float) -> list[Frame]:
        """Send ``frames`` and return the reply frames (writable zero-copy buffers)."""
        deadline = time.monotonic() + timeout
        sock = self._acquire()
        ok = False
        try:
            try:  # connected sockets take the message at once; only new ones wait for a peer
                _send(sock, frames)
            except zmq.Again:
                if not sock.poll(
                    max(0, int(min(timeout, self.connect_timeout) * 1000)), zmq.POLLOUT
                ):
                    if timeout < self.connect_timeout:
                        raise RemoteTimeoutError(
                            f"no connection to {self.endpoint} within the {timeout:.3g} s timeout"
                        ) from None
                    raise UnreachableError(
                        f"cannot connect to {self.endpoint} within {self.connect_timeout:.3g} s"
                    ) from None
                _send(sock, frames)
            left_ms = int((deadline - time.monotonic()) * 1000) + 1
            if left_ms <= 1:
                raise RemoteTimeoutError(f"no reply from {self.endpoint} within {timeout:.3g} s")
            # RCVTIMEO bounds the blocking receive; round it up to 10 ms steps so that
            # back-to-back calls with the same timeout rarely need a setsockopt
            rcvtimeo = -(-left_ms // 10) * 10
            if self._rcvtimeo.get(sock) != rcvtimeo:
                sock.setsockopt(zmq.RCVTIMEO, rcvtimeo)
                self._rcvtimeo[sock] = rcvtimeo
            try:
                part = sock.recv(copy=False)
            except zmq.Again:
                raise RemoteTimeoutError(
                    f"no reply from {self.endpoint} within {timeout:.3g} s"
                ) from None
            reply = [part.buffer]
            while part.more:  # the rest of a multipart message is already here
                part = sock.recv(copy=False)
                reply.append(part.buffer)
            ok = True
            return reply
        except zmq.ZMQError as e:
            raise UnreachableError(f"transport error talking to {self.endpoint}: {e}") from None
        finally:
            if ok:
                self._release(sock)
            else:
                self._rcvtimeo.pop(sock, None)
                sock.close(linger=0)

    def close(self) -> None:
        """Close idle sockets; sockets in use are closed when their call returns."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            for sock in idle:
                self._rcvtimeo.pop(sock, None)
        for sock in idle:
            sock.close(linger=0)

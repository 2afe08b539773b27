"""``ZmqFrontend``: a ZeroMQ ROUTER socket on TCP that feeds requests into a ``Runtime``.

The socket is attached to the runtime's ``ServingLoop``: the loop thread receives messages
(zero-copy: ``copy=False`` frames whose writable buffers the tensor decoder wraps as they
are), strips the routing envelope, calls ``runtime.submit`` and, since replies are produced
in that same thread, sends them straight back with ``copy=False`` (tensor memory goes to
libzmq without a copy for frames >= 512 KiB; smaller ones are cheaper to copy) and
``NOBLOCK`` (a client that stopped reading loses its replies instead of stalling the
server). No extra thread, no hand-off per request.

Memory, and what bounds it (``L`` = the runtime's ``ServingLimits``):

- **Admitted requests**: ``runtime.submit`` reserves each request's payload bytes against
  ``L.max_queued_bytes`` before decoding it and releases them when the reply is sent; beyond
  that the request is answered ``overloaded`` at once (typed, nothing decoded or queued).
  So the requests the runtime holds (queued, computing or being answered) take at most
  ``max_queued_bytes`` plus one header (<= ``max_header_bytes``) each, in total, whatever
  the number of peers. The loop keeps reading while over the bound (refusing is cheap), so
  libzmq's queues drain instead of filling up.
- **libzmq, per connection**: ``ZMQ_MAXMSGSIZE`` = the largest frame the wire limits allow
  (``max(max_bytes, max_header_bytes)``): a larger frame disconnects the peer before libzmq
  allocates it. ``RCVHWM`` = ``PEER_HWM`` complete messages wait per connection (beyond:
  libzmq stops reading that socket: TCP backpressure, nothing dropped) and ``SNDHWM`` =
  ``PEER_HWM`` replies (beyond: the reply is dropped, the peer is not reading). libzmq
  allocates a frame's buffer when its size is announced but pages are committed as bytes
  arrive, so what a connection holds is what it actually sent and is not yet read, at most
  ``(PEER_HWM + 1) x message`` while the loop is busy computing a batch.
- **Not bounded here (a known hole)**: libzmq has no limit on the number of connections
  nor on the number of parts of one multipart message, and it keeps reading the parts of a
  message that is not finished yet (it hands a message over only once all parts arrived;
  the wire decoder's ``max_tensors + 1`` frames check comes after that). Measured with
  libzmq 4.3.5: one connection sending 300 parts of 1 MiB without ever ending the message
  grew the server by 300 MiB while nothing was readable. Closing it needs the project's own
  ZMTP reader (``volunteer.wire.zmtp``) on the server side, which can refuse a message at
  the frame header that breaks a bound.
"""

from __future__ import annotations

import logging

import zmq

from volunteer.runtime.runtime import Runtime

log = logging.getLogger(__name__)

RECV_BURST = 256  # messages taken per wake-up before the loop runs a batch
# complete messages libzmq holds per connection while a batch computes (beyond: TCP
# backpressure); clients send one request per connection at a time (``ZmqTransport``)
PEER_HWM = 4
# Frames below this size are copied on send: pyzmq's zero-copy path costs ~25-85 us per frame
# (a free-callback via its GC thread) while memcpy of 128 KiB costs ~5 us; above it, zero-copy wins.
COPY_THRESHOLD = 512 * 1024
# plain ints: pyzmq's flag enums cost an enum construction per ``|`` / ``&`` on the hot path
_NOBLOCK = int(zmq.NOBLOCK)
_SEND_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


class ZmqFrontend:
    """ROUTER frontend; ``bind`` may use port 0 (the chosen port is in ``.endpoint``)."""

    def __init__(
        self, runtime: Runtime, bind: str = "tcp://127.0.0.1:0", context: zmq.Context | None = None
    ) -> None:
        self.runtime = runtime
        self.bind = bind
        self.endpoint: str | None = None
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None

    def start(self) -> None:
        """Bind and attach to the runtime's loop; ``.endpoint`` is valid on return."""
        if not self.runtime.loop.alive:
            raise RuntimeError("start the runtime before its frontends")
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        limits = self.runtime.limits
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes(limits))
        sock.setsockopt(zmq.RCVHWM, PEER_HWM)
        sock.setsockopt(zmq.SNDHWM, PEER_HWM)
        sock.copy_threshold = COPY_THRESHOLD
        bind = self.bind[:-2] + ":*" if self.bind.endswith(":0") else self.bind
        try:
            sock.bind(bind)
        except zmq.ZMQError as e:
            sock.close()
            raise OSError(
                f"cannot bind the ZeroMQ frontend to {self.bind}: {e}; pick another address/port"
            ) from e
        self.endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._socket = sock
        self.runtime.loop.attach(sock, self._on_readable, self._on_detach)

    def stop(self) -> None:
        """Detach from the loop and close the socket (pending replies are dropped)."""
        sock, self._socket = self._socket, None
        if sock is None:
            return
        if self.runtime.loop.detach(sock):
            return  # closed by the loop (on_detach)
        if not sock.closed:  # the loop is gone (runtime stopped first): close it here
            sock.close(linger=0)

    # -- loop thread only --

    def _on_detach(self, sock: zmq.Socket) -> None:
        sock.close(linger=0)

    def _on_readable(self, sock: zmq.Socket) -> None:
        submit = self.runtime.submit
        for _ in range(RECV_BURST):
            # frames one by one (``Frame.more``) and ``EVENTS`` to see whether another message
            # waits: cheaper than recv_multipart's option reads and than raising zmq.Again
            try:
                part = sock.recv(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            msg = [part]
            while part.more:
                part = sock.recv(copy=False)
                msg.append(part)
            # ROUTER prepends the peer identity; REQ peers add an empty delimiter frame.
            cut = 2 if len(msg) > 1 and len(msg[1]) == 0 else 1
            submit([f.buffer for f in msg[cut:]], self._reply_to(sock, msg[:cut]))
            if not sock.get(_EVENTS) & _POLLIN:
                return

    def _reply_to(self, sock: zmq.Socket, envelope: list) -> object:
        loop = self.runtime.loop

        def reply(frames: list) -> None:
            if loop.in_loop():
                _send(sock, envelope, frames)
            elif loop.alive:
                loop.call_soon(_send, sock, envelope, frames)

        return reply


def _send(sock: zmq.Socket, envelope: list, frames: list) -> None:
    if sock.closed:
        return
    parts = [*envelope, *frames]
    last = len(parts) - 1
    try:  # part by part: send_multipart re-validates every part in Python first
        for i, part in enumerate(parts):
            sock.send(part, _SEND_MORE if i < last else _NOBLOCK, copy=False)
    except zmq.Again:  # only the first part can be refused (multipart messages are atomic)
        log.debug("dropping a reply: peer is not reading")
    except zmq.ZMQError as e:
        log.debug("dropping a reply: %s", e)


def max_frame_bytes(limits: object) -> int:
    """The largest single frame a valid request can carry (the header or one tensor)."""
    return max(int(limits.max_bytes), int(limits.max_header_bytes))  # type: ignore[attr-defined]

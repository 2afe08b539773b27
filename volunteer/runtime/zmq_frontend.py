"""``ZmqFrontend``: a ZeroMQ ROUTER endpoint on TCP that feeds requests into a ``Runtime``.

Clients are ZeroMQ DEALER / REQ sockets (libzmq's, or ``volunteer.wire.zmtp``): the server
side is the project's own ZMTP 3.0 reader, ``volunteer.runtime.zmtp_server.ZmtpServer``,
run by one IO thread of its own (a second ``ServingLoop``: epoll, non-blocking sockets, no
compute). It reads frames into buffers of their exact size (the tensor decoder wraps them as
they are) and calls ``runtime.submit``, which queues the request and wakes the runtime's
loop; replies, produced in the runtime's loop (or by the shard server behind
``Runtime.side``), are handed back with ``call_soon`` and written with ``sendmsg`` straight
from the tensors' memory. The IO thread plays the part libzmq's IO thread played: requests
keep arriving, whole, while a batch computes (a message larger than the kernel's socket
buffers would otherwise only move between batches, and large requests could never queue
behind each other), and replies leave while the next batch computes.

ROUTER semantics as libzmq has them for these peers: a reply goes back on the connection
that sent the request; a REQ peer's empty delimiter frame is stripped from the request and
put back in front of the reply (DEALER peers send none).

Memory, and what bounds it (``L`` = the runtime's ``ServingLimits``; details in
``zmtp_server``): every frame's bytes are reserved against ``L.max_queued_bytes`` (the same
budget ``Runtime.submit`` uses) when its header arrives, before its buffer is allocated,
and given back when the request is answered; a frame beyond the budget is read and dropped
and the request answered ``overloaded``. So the requests held (half read, queued, computing
or being answered) take at most ``max_queued_bytes`` in total, whatever the number of
peers. Per connection: frames of at most ``max(L.max_bytes, L.max_header_bytes)`` bytes,
``L.max_tensors + MESSAGE_FRAME_SLACK`` frames per message and ``L.max_header_bytes +
L.max_bytes`` bytes per message (beyond: closed, or answered ``too_large``), at most
``MAX_CONNECTIONS`` connections (the idle one is closed for a new one), deadlines for the
handshake, an unfinished message and unread replies, and at most
``ZmtpServerLimits.max_pending_reply_bytes`` of unsent replies (beyond: disconnected).
"""

from __future__ import annotations

import logging

from volunteer.net.rate_limit import Traffic
from volunteer.runtime.loop import ServingLoop
from volunteer.runtime.runtime import Runtime
from volunteer.runtime.zmtp_conn import Alloc, ZmtpConn
from volunteer.runtime.zmtp_server import ZmtpServer, ZmtpServerLimits
from volunteer.wire.errors import RemoteError
from volunteer.wire.messages import encode_error, reply_request_id

log = logging.getLogger(__name__)

MESSAGE_FRAME_SLACK = 6  # frames beyond the tensors: header, REQ delimiter, and some room
MAX_CONNECTIONS = 512
_NO_ENVELOPE: list = []
_REQ_ENVELOPE = [b""]


def server_limits(limits: object, **overrides: object) -> ZmtpServerLimits:
    """The ZMTP server's bounds derived from a ``ServingLimits`` (``overrides`` win)."""
    base = dict(
        max_frame_bytes=max_frame_bytes(limits),
        max_frames=int(limits.max_tensors) + MESSAGE_FRAME_SLACK,  # type: ignore[attr-defined]
        max_message_bytes=int(limits.max_header_bytes) + int(limits.max_bytes),  # type: ignore[attr-defined]
        max_connections=MAX_CONNECTIONS,
    )
    base.update(overrides)
    return ZmtpServerLimits(**base)  # type: ignore[arg-type]


class ZmqFrontend:
    """ROUTER frontend; ``bind`` may use port 0 (the chosen port is in ``.endpoint``).

    ``server`` overrides fields of the derived ``ZmtpServerLimits`` (tests, tuning).
    ``alloc(size)`` allocates the buffer every received frame lands in (default
    ``bytearray(size)``; e.g. pinned host memory on a GPU node; see
    ``volunteer.runtime.zmtp_conn``): requests' tensors wrap these buffers. ``traffic`` (a
    ``volunteer.net.rate_limit.Traffic``, None: uncapped) caps the upload and download rate
    of every connection together and counts the bytes (read at ``start``)."""

    def __init__(self, runtime: Runtime, bind: str = "tcp://127.0.0.1:0",
                 server: dict | None = None, alloc: Alloc | None = None,
                 traffic: Traffic | None = None) -> None:
        self.runtime = runtime
        self.traffic = traffic
        self._alloc = alloc
        self.bind = bind
        self.endpoint: str | None = None
        self._overrides = dict(server or {})
        self._server: ZmtpServer | None = None
        self._io: ServingLoop | None = None
        self._wire = runtime.limits.wire()

    def start(self) -> None:
        """Bind and attach to the runtime's loop; ``.endpoint`` is valid on return (clients
        that connect before the loop picks the socket up wait in the listen backlog)."""
        if not self.runtime.loop.alive:
            raise RuntimeError("start the runtime before its frontends")
        host, port = _parse_endpoint(self.bind)
        io = ServingLoop(_no_work, _nothing, name="volunteer-zmtp")
        server = ZmtpServer(io, server_limits(self.runtime.limits, **self._overrides),
                            self.runtime.reserve_bytes, self.runtime.release_bytes,
                            self._on_message, self._on_refused, alloc=self._alloc,
                            traffic=self.traffic)
        try:
            bound_host, bound_port = server.bind(host, port)
        except OSError as e:
            io.stop()
            raise OSError(
                f"cannot bind the ZeroMQ frontend to {self.bind}: {e}; pick another address/port"
            ) from e
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.endpoint = f"tcp://{shown}:{bound_port}"
        self._server, self._io = server, io
        io.call_soon(server.attach)
        io.start()

    def stop(self) -> None:
        """Stop listening and close every connection (pending replies are dropped)."""
        server, io = self._server, self._io
        self._server = self._io = None
        if server is None or io is None:
            return
        if not io.run_sync(server.close):
            server.close()  # the IO thread is gone: nothing else uses the server
        io.stop()

    def stats(self) -> dict[str, int]:
        """Connection and message counters of the server (see ``ZmtpServer.stats``)."""
        server, io = self._server, self._io
        if server is None or io is None:
            return {}
        out: dict[str, int] = {}
        if not io.run_sync(lambda: out.update(server.stats())):
            out.update(server.stats())
        return out

    # -- IO thread only --

    def _on_message(self, conn: ZmtpConn, frames: list, held: int) -> None:
        # REQ peers put an empty delimiter frame first; it goes back in front of the reply
        if len(frames) > 1 and frames[0].nbytes == 0:
            envelope, frames = _REQ_ENVELOPE, frames[1:]
        else:
            envelope = _NO_ENVELOPE
        self.runtime.submit(frames, self._reply_to(conn, envelope), held=held)

    def _on_refused(self, conn: ZmtpConn, frames: list, error: RemoteError) -> None:
        envelope = _NO_ENVELOPE
        if len(frames) > 1 and frames[0].nbytes == 0:
            envelope, frames = _REQ_ENVELOPE, frames[1:]
        rid = reply_request_id(frames[0], self._wire) if frames else None
        self.runtime.rejected.record_error(error.code)
        self._reply_to(conn, envelope)(encode_error(rid, error.code, error.message))

    def _reply_to(self, conn: ZmtpConn, envelope: list) -> object:
        io = self._io
        server = self._server

        def reply(frames: list) -> None:  # any thread: the runtime's loop, mostly
            if server is None or io is None:
                return
            if io.in_loop():
                server.send(conn, [*envelope, *frames] if envelope else frames)
            elif io.alive:
                io.call_soon(server.send, conn, [*envelope, *frames] if envelope else frames)

        return reply


def _no_work() -> bool:
    return False


def _nothing() -> None:
    return None


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``tcp://host:port`` (``*`` for all interfaces, ``[v6]`` allowed) -> (host, port)."""
    if not endpoint.startswith("tcp://"):
        raise OSError(f"cannot bind the ZeroMQ frontend to {endpoint}: only tcp:// is served")
    rest = endpoint[len("tcp://"):]
    host, sep, port_s = rest.rpartition(":")
    if port_s == "*":
        port_s = "0"
    if not sep or not port_s.isdigit() or int(port_s) > 65535:
        raise OSError(f"cannot bind the ZeroMQ frontend to {endpoint}: no valid port")
    host = host.strip("[]")
    if host == "*":
        host = "0.0.0.0"
    return host, int(port_s)


def max_frame_bytes(limits: object) -> int:
    """The largest single frame a valid request can carry (the header or one tensor)."""
    return max(int(limits.max_bytes), int(limits.max_header_bytes))  # type: ignore[attr-defined]

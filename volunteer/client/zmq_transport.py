"""``ZmqTransport``: the ``Transport`` for servers reachable over TCP (a ZmqFrontend).

A pool of ZMTP connections (``volunteer.wire.zmtp``: ZeroMQ's wire protocol spoken from
the calling thread, so no libzmq IO thread sits between the caller and the kernel). Each
request borrows an idle connection (or opens one), sends, reads the reply within the call's
timeout, and returns the connection; so calls from many threads run in parallel and
connections are reused. A connection whose request failed or timed out is closed rather
than returned (a late reply must never be read as the answer to a later request), and an
idle connection that became readable (the server closed it, e.g. on restart) is dropped
before reuse. No connection (TCP + ZMTP handshake) within ``connect_timeout`` means
``UnreachableError``; no reply within ``timeout`` means ``RemoteTimeoutError``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from volunteer.wire.errors import RemoteTimeoutError, UnreachableError
from volunteer.wire.zmtp import DEFAULT_SPIN_S, ZmtpConnection, ZmtpError, ZmtpTimeout

Frame = bytes | bytearray | memoryview


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``tcp://host:port`` (IPv6 hosts in brackets) as ``(host, port)``; ValueError if not."""
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"endpoint {endpoint!r} must look like tcp://host:port")
    host, sep, port = endpoint[len("tcp://") :].rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {endpoint!r} must look like tcp://host:port")
    return host, int(port)


class ZmqTransport:
    """Thread-safe request/reply to one ``tcp://host:port`` endpoint. ``spin_s``: how long
    a waiting call polls for its reply before sleeping (one caller per process at a time;
    0 never polls; see ``ZmtpConnection._wait_readable``)."""

    def __init__(
        self,
        endpoint: str,
        connect_timeout: float = 5.0,
        max_idle_sockets: int = 64,
        max_reply_bytes: int = 512 * 2**20,
        spin_s: float = DEFAULT_SPIN_S,
    ) -> None:
        self.endpoint = endpoint
        self.spin_s = spin_s
        self.connect_timeout = connect_timeout
        self.max_idle_sockets = max_idle_sockets
        self.max_reply_bytes = max_reply_bytes
        self._address: tuple[str, int] | None = None
        self._bad_endpoint: str | None = None
        try:
            self._address = parse_endpoint(endpoint)
        except ValueError as e:
            self._bad_endpoint = str(e)
        self._idle: list[ZmtpConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"ZmqTransport({self.endpoint!r})"

    def _acquire(self, deadline: float, timeout: float) -> ZmtpConnection:
        while True:
            with self._lock:
                if self._closed:
                    raise UnreachableError(f"transport to {self.endpoint} is closed")
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(deadline, timeout)
            if not conn.stale():
                return conn
            conn.close()

    def _connect(self, deadline: float, timeout: float) -> ZmtpConnection:
        if self._address is None:
            raise UnreachableError(f"bad endpoint: {self._bad_endpoint}")
        connect_deadline = min(deadline, time.monotonic() + self.connect_timeout)
        try:
            return ZmtpConnection(
                *self._address,
                connect_deadline,
                max_reply_bytes=self.max_reply_bytes,
                spin_s=self.spin_s,
            )
        except ZmtpTimeout:
            if timeout < self.connect_timeout:
                raise RemoteTimeoutError(
                    f"no connection to {self.endpoint} within the {timeout:.3g} s timeout"
                ) from None
            raise UnreachableError(
                f"cannot connect to {self.endpoint} within {self.connect_timeout:.3g} s"
            ) from None
        except ZmtpError as e:
            raise UnreachableError(f"cannot connect to {self.endpoint}: {e}") from None

    def _release(self, conn: ZmtpConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.max_idle_sockets:
                self._idle.append(conn)
                return
        conn.close()

    def request(self, frames: Sequence[Frame], timeout: float) -> list[Frame]:
        """Send ``frames`` and return the reply frames (writable buffers)."""
        deadline = time.monotonic() + timeout
        conn = self._acquire(deadline, timeout)
        try:
            reply = conn.request(frames, deadline)
        except ZmtpTimeout:
            conn.close()
            raise RemoteTimeoutError(
                f"no reply from {self.endpoint} within {timeout:.3g} s"
            ) from None
        except ZmtpError as e:
            conn.close()
            raise UnreachableError(f"transport error talking to {self.endpoint}: {e}") from None
        except BaseException:
            conn.close()
            raise
        self._release(conn)
        return reply  # type: ignore[return-value]

    def close(self) -> None:
        """Close idle connections; connections in use are closed when their call returns."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

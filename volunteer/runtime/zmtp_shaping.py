"""``ZmtpShaping``: bandwidth caps on ``ZmtpServer``'s connections, without sleeping.

With ``traffic`` (a ``volunteer.net.rate_limit.Traffic``), a connection reads at most what
the download bucket holds and writes at most what the upload bucket holds. When a bucket
runs dry, the connection's reads (or writes) leave the epoll mask and a one-shot loop timer
brings them back once ``MIN_CHUNK`` bytes (or a full bucket, if smaller) have refilled:
nothing sleeps in the IO thread, the other connections go on, and the kernel's socket
buffers push back on the peer. The time a connection is held back does not count against
its message or stall deadlines (``ZmtpServer._check_deadlines`` skips a held connection and
``_resume`` moves the message's start by the pause).

The timer resumes the connection through ``call_soon`` rather than directly: a timer set
from inside a timer callback would only be noticed at the loop's next timer.
"""

from __future__ import annotations

import collections
import itertools
import time

from volunteer.net.rate_limit import TokenBucket, Traffic
from volunteer.runtime.loop import READ, WRITE, ServingLoop
from volunteer.runtime.zmtp_conn import ZmtpConn

MIN_CHUNK = 16 * 1024  # a capped connection waits for at least this much (or a full bucket)


class ZmtpShaping:
    """Mixin of ``ZmtpServer`` (which provides ``loop``, ``traffic`` and ``_flush``)."""

    loop: ServingLoop
    traffic: Traffic | None

    def _flush(self, conn: ZmtpConn) -> None:  # pragma: no cover - the server's
        raise NotImplementedError

    def _set_mask(self, conn: ZmtpConn) -> None:
        """Poll for reads unless held back, for writes while replies wait on the socket."""
        if conn.sock is not None:
            self.loop.modify(conn.fd, (READ if conn.rx_timer is None else 0)
                             | (WRITE if conn.want_write else 0))

    def _allowance(self, conn: ZmtpConn, bucket: TokenBucket, rx: bool) -> int:
        """Bytes ``conn`` may read (``rx``) or write now; 0 after holding it back."""
        chunk = min(MIN_CHUNK, bucket.burst)
        avail = bucket.available()
        if avail >= chunk:
            return int(avail)
        delay = max(bucket.wait_time(chunk), 0.001)
        timer: list = []

        def fire() -> None:
            self.loop.cancel(timer[0])
            self.loop.call_soon(self._resume, conn, rx)

        timer.append(self.loop.every(delay, fire))
        if rx:
            conn.rx_timer = timer[0]
            conn.rx_paused_at = time.monotonic()
        else:
            conn.tx_timer = timer[0]
        self._set_mask(conn)
        return 0

    def _resume(self, conn: ZmtpConn, rx: bool) -> None:
        if conn.sock is None:
            return
        now = time.monotonic()
        if rx:
            conn.rx_timer = None
            if conn.msg_start:  # the time this node held the message back is not the peer's
                conn.msg_start = min(now, conn.msg_start + now - conn.rx_paused_at)
            self._set_mask(conn)  # epoll says when there is something to read
        else:
            conn.tx_timer = None
            conn.last_tx = now
            self._flush(conn)


def take_parts(out: collections.deque, limit: int, iov_max: int) -> list:
    """The leading parts of ``out`` (at most ``iov_max``) holding at most ``limit`` bytes; a
    part that does not fit whole is cut (a byte view of its head)."""
    batch: list = []
    for part in itertools.islice(out, iov_max):
        n = part.nbytes if type(part) is memoryview else len(part)
        if n > limit:
            if limit:
                mv = part if type(part) is memoryview else memoryview(part)
                batch.append((mv if mv.ndim == 1 and mv.format == "B" else mv.cast("B"))[:limit])
            break
        batch.append(part)
        limit -= n
    return batch

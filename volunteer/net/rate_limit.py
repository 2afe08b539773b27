"""Bandwidth caps: one token bucket per direction, shared by every path that moves expert or
shard bytes, plus the byte meter that feeds the daily transfer cap.

``TokenBucket(rate, burst)`` holds up to ``burst`` tokens (bytes) and refills at ``rate``
bytes/s. It is thread-safe (one lock; the ZeroMQ IO thread, the trio thread and worker
threads share one bucket) and never sleeps by itself: callers ask how long to wait and wait
in their own way, so nothing blocks an event loop for others:

- ``consume(n)`` takes ``n`` tokens (the balance may go negative: a debt) and returns the
  seconds until the balance is back at zero; concurrent consumers queue up by their debt,
  so the aggregate rate converges to ``rate`` whatever their number;
- ``available()`` / ``wait_time(n)`` let a poll loop read only what the bucket allows and
  come back (a timer, not a busy wait) once ``n`` tokens are there.

``Traffic(up, down, meter)`` is what the servers and the downloader are given: ``sent(n)``
/ ``received(n)`` charge the bucket of that direction (when capped) and count the bytes in
``meter(n_in, n_out)`` (when set: the daily cap's ``TransferQuota.add``), and return the delay
to honour; ``await send_async(n)`` / ``await receive_async(n)`` do that and sleep in trio.
``Traffic.build(upload, download, meter)`` returns None when nothing is capped or counted, and
every hook tests ``traffic is None`` first: unlimited costs one attribute test per read/write.

Where the buckets act: the ZeroMQ frontend (``runtime.zmtp_server``: a connection's reads and
writes are delayed by a loop timer, never by sleeping in the IO thread), the libp2p RPC
server (``net.rpc_server``: a request body is paid for before it is read, a reply before it
is written; this also covers shards served over libp2p) and the shard downloader
(``net.shard_download``: a chunk is paid for before it is asked for).

``parse_bytes`` / ``format_bytes`` are the one place human sizes and rates ("1.5MB/s",
"10 MiB", "500k") are read and shown; the bandwidth settings use them.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable

MIN_BURST = 64 * 1024  # bytes: a bucket holds at least this much (a few TCP segments' worth)
BURST_S = 0.05  # ... and at least this many seconds of its rate

Meter = Callable[[int, int], None]
"""``meter(bytes_in, bytes_out)``: counts traffic (thread-safe, cheap, never raises)."""


class TokenBucket:
    """A thread-safe token bucket of ``rate`` bytes/s and ``burst`` bytes (see module doc)."""

    __slots__ = ("_clock", "_lock", "_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``rate`` > 0 bytes/s; ``burst`` defaults to ``max(MIN_BURST, BURST_S * rate)``; the
        bucket starts full. ``clock`` is monotonic seconds (tests pass a fake one)."""
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number of bytes/s, got {rate!r}")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(MIN_BURST, BURST_S * self.rate)
        if not self.burst > 0:
            raise ValueError(f"burst must be positive, got {burst!r}")
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._stamp = clock()

    def _refill(self) -> float:
        now = self._clock()
        tokens = self._tokens + (now - self._stamp) * self.rate
        self._tokens = tokens if tokens < self.burst else self.burst
        self._stamp = now
        return self._tokens

    def available(self) -> float:
        """Tokens there now (negative while a debt is being paid back)."""
        with self._lock:
            return self._refill()

    def wait_time(self, n: float) -> float:
        """Seconds until ``n`` tokens (at most ``burst``) are there; 0 when they are now."""
        with self._lock:
            missing = min(n, self.burst) - self._refill()
        return missing / self.rate if missing > 0 else 0.0

    def consume(self, n: float) -> float:
        """Take ``n`` tokens (the balance may go negative); seconds until it is back at 0."""
        with self._lock:
            self._refill()
            self._tokens -= n
            debt = -self._tokens
        return debt / self.rate if debt > 0 else 0.0


class Traffic:
    """Upload/download buckets (None: uncapped) and a byte meter, for the serving paths."""

    __slots__ = ("down", "meter", "up")

    def __init__(self, up: TokenBucket | None = None, down: TokenBucket | None = None,
                 meter: Meter | None = None) -> None:
        self.up = up
        self.down = down
        self.meter = meter

    @classmethod
    def build(cls, upload: float = 0, download: float = 0, meter: Meter | None = None,
              clock: Callable[[], float] = time.monotonic) -> Traffic | None:
        """Caps in bytes/s (0: unlimited) -> a ``Traffic``, or None when there is nothing to
        cap or count (then the hot paths skip shaping entirely)."""
        if not upload and not download and meter is None:
            return None
        return cls(TokenBucket(upload, clock=clock) if upload else None,
                   TokenBucket(download, clock=clock) if download else None, meter)

    def sent(self, n: int) -> float:
        """Count ``n`` bytes sent; the seconds the sender should wait before sending more."""
        if self.meter is not None:
            self.meter(0, n)
        return self.up.consume(n) if self.up is not None else 0.0

    def received(self, n: int) -> float:
        """Count ``n`` bytes received; the seconds the reader should wait before reading more."""
        if self.meter is not None:
            self.meter(n, 0)
        return self.down.consume(n) if self.down is not None else 0.0

    async def send_async(self, n: int) -> None:
        """``sent(n)`` then sleep its delay (trio): call before writing ``n`` bytes."""
        delay = self.sent(n)
        if delay > 0:
            import trio

            await trio.sleep(delay)

    async def receive_async(self, n: int) -> None:
        """``received(n)`` then sleep its delay (trio): call before reading ``n`` bytes."""
        delay = self.received(n)
        if delay > 0:
            import trio

            await trio.sleep(delay)

    def describe(self) -> dict[str, float | None]:
        """The caps in bytes/s (None: unlimited), for status and metrics."""
        return {"upload_bytes_per_s": self.up.rate if self.up is not None else None,
                "download_bytes_per_s": self.down.rate if self.down is not None else None}


# -- human sizes --

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgt]i?)?b?(?:\s*/\s*s)?\s*$", re.I)


def parse_bytes(value: object) -> int:
    """A byte count or rate from an int or a human string -> int bytes (or bytes/s).

    Accepts ``1500000``, ``1.5MB``, ``1.5 MB/s``, ``500k``, ``2MiB``, ``10 GiB``; SI units are
    powers of 1000 (``MB`` = 10^6), ``Ki``/``Mi``/``Gi``/``Ti`` powers of 1024; ``b``/``B``
    both mean bytes. ``ValueError`` for anything else (negative, NaN, unknown units)."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(value)
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(value)
        return int(value)
    text = str(value)
    match = _SIZE.match(text)
    if match is None or len(text) > 64:
        raise ValueError(value)
    number, unit = match.group(1), (match.group(2) or "").lower()
    out = float(number) * _UNITS[unit]
    if not math.isfinite(out) or out >= 2**63:
        raise ValueError(value)
    return int(out)


def format_bytes(n: float) -> str:
    """``5000000000`` -> ``"5.0 GB"`` (SI, one decimal; plain bytes below 1 kB)."""
    n = float(n)
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"

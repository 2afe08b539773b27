"""Per-expert serving statistics: counts, rates, batch sizes, queue wait and compute latency
percentiles (from a bounded window of recent samples), errors by code, cache hits, and the
bytes that crossed the wire for the expert: ``bytes_in`` (requests as received, header and
tensor frames: what the trainers' chosen compression costs the node's downlink) and
``bytes_out`` (result replies as sent), with their rates over the last ``RATE_WINDOW_S``.

Written by the runtime threads, read by the daemon via ``Runtime.stats()``; every snapshot
is plain JSON-serialisable data.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque

WINDOW = 2048  # latency samples kept per expert
RATE_WINDOW_S = 10.0
HISTOGRAM_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    idx = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[idx]


_LABELS = [f"<={b}" for b in HISTOGRAM_BOUNDS] + [f">{HISTOGRAM_BOUNDS[-1]}"]


def _bucket(size: int) -> str:
    return _LABELS[bisect.bisect_left(HISTOGRAM_BOUNDS, size)]


class ExpertStats:
    """Thread-safe counters for one expert uid."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.samples = 0
        self.batches = 0
        self.batch_rows = 0
        self.ops: Counter[str] = Counter()
        self.histogram: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.cache: Counter[str] = Counter()
        self._queue_ms: deque[float] = deque(maxlen=WINDOW)
        self._compute_ms: deque[float] = deque(maxlen=WINDOW)
        self._recent: deque[tuple[float, int, int]] = deque(maxlen=WINDOW)
        self.bytes_in = 0
        self.bytes_out = 0
        # [whole second, bytes in, bytes out]: per-second buckets, so the rates see every
        # byte of the window however many messages carried them
        self._io: deque[list[int]] = deque(maxlen=int(RATE_WINDOW_S) + 2)
        self._started = time.monotonic()

    def record_batch(
        self, op: str, n_requests: int, rows: int, queue_ms: list[float], compute_ms: float
    ) -> None:
        now = time.monotonic()
        with self._lock:
            self.requests += n_requests
            self.samples += rows
            self.batches += 1
            self.batch_rows += rows
            self.ops[op] += n_requests
            self.histogram[_bucket(rows)] += 1
            self._queue_ms.extend(queue_ms)
            self._compute_ms.append(compute_ms)
            self._recent.append((now, n_requests, rows))

    def record_bytes_in(self, nbytes: int) -> None:
        """Count one request's bytes as received (``Request.wire_nbytes``)."""
        self._record_io(nbytes, 0)

    def record_bytes_out(self, nbytes: int) -> None:
        """Count one reply's bytes as sent (``volunteer.wire.messages.frames_nbytes``)."""
        self._record_io(0, nbytes)

    def _record_io(self, n_in: int, n_out: int) -> None:
        second = int(time.monotonic())
        with self._lock:
            self.bytes_in += n_in
            self.bytes_out += n_out
            if self._io and self._io[-1][0] == second:
                bucket = self._io[-1]
                bucket[1] += n_in
                bucket[2] += n_out
            else:
                self._io.append([second, n_in, n_out])

    def record_error(self, code: str) -> None:
        with self._lock:
            self.errors[code] += 1

    def record_cache(self, outcome: str, n: int = 1) -> None:
        with self._lock:
            self.cache[outcome] += n

    def snapshot(self, queue_depth: int, updates_applied: int) -> dict:
        now = time.monotonic()
        with self._lock:
            window = min(RATE_WINDOW_S, max(now - self._started, 1e-3))
            recent = [(r, s) for t, r, s in self._recent if now - t <= window]
            queue_ms = list(self._queue_ms)
            compute_ms = list(self._compute_ms)
            io = [(n_in, n_out) for sec, n_in, n_out in self._io if now - (sec + 1) < window]
            return {
                "requests": self.requests,
                "samples": self.samples,
                "requests_per_s": sum(r for r, _ in recent) / window,
                "samples_per_s": sum(s for _, s in recent) / window,
                "mean_batch_size": self.batch_rows / self.batches if self.batches else 0.0,
                "batch_size_histogram": dict(self.histogram),
                "queue_depth": queue_depth,
                "latency_ms": {
                    "queue_p50": _percentile(queue_ms, 0.5),
                    "queue_p99": _percentile(queue_ms, 0.99),
                    "compute_p50": _percentile(compute_ms, 0.5),
                    "compute_p99": _percentile(compute_ms, 0.99),
                },
                "errors": dict(self.errors),
                "ops": dict(self.ops),
                "activation_cache": dict(self.cache),
                "updates_applied": updates_applied,
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "bytes_in_per_s": sum(i for i, _ in io) / window,
                "bytes_out_per_s": sum(o for _, o in io) / window,
            }

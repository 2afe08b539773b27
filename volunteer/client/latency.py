"""Adaptive per-call deadlines: a moving percentile of the latency each server shows.

One fixed timeout is wrong both ways: generous enough for a volunteer on a slow home link,
it lets a hung server cost that long on every step; tight enough to cut hung servers fast,
it cuts slow-but-healthy ones every time. ``LatencyTracker`` keeps, per key (a server
endpoint and an op: a forward and a backward of one server are tracked apart), the last
``window`` observed round trips no older than ``max_age`` seconds, and turns them into the
deadline for the next call::

    deadline = min(configured, max(floor, factor * percentile(q), backoff))

- no history (fewer than ``min_samples`` recent observations): the configured timeout, so a
  first call is never cut by a guess;
- ``backoff``: after a timeout the next call to that key waits at least twice as long as the
  one that timed out, until a call answers (a server that became slower gets a longer
  deadline at once instead of timing out until the window fills with timeouts); a timeout
  is also observed as a latency of the time it took (a censored value: the real latency was
  longer);
- memory is bounded: ``window`` floats per key, ``max_keys`` keys (least recently used
  forgotten first); every operation is O(window log window) under one lock.

The defaults (4 x p95 over the last 64 calls, never under 2 s) are deliberately loose: a
call cut too early costs more than one waited for too long (the layer then avoids that
expert for a while), and a hung server cut after a few seconds instead of the configured
30 s is already most of the gain. Measured on the shaped link of ``scripts/bench_link.py``
(12 calls of 256 KiB in flight over 100 Mbit/s, 40 ms, a CPU shared with other work), 3 x p95
with a 1 s floor cut a healthy call that had waited 1.2 s behind the others.

The clock is injectable so that tests are deterministic.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["LatencyTracker", "default_tracker", "endpoint_key"]


@dataclass
class _History:
    samples: deque = field(default_factory=deque)  # (time observed, seconds), oldest first
    backoff: float = 0.0  # lower bound on the next deadline after a timeout (0: none)


class LatencyTracker:
    """Thread-safe per-key latency history and the deadlines it implies.

    ``percentile`` in (0, 1]; ``factor`` >= 1 multiplies it; ``floor`` is the shortest
    deadline ever given (seconds); ``window`` samples are kept per key, each for at most
    ``max_age`` seconds; ``min_samples`` recent samples are needed before a deadline adapts;
    ``max_keys`` bounds how many keys (servers) are tracked, the least recently used going
    first; ``clock`` is the monotonic time source (tests pass a fake one).
    """

    def __init__(
        self,
        *,
        percentile: float = 0.95,
        factor: float = 4.0,
        floor: float = 2.0,
        window: int = 64,
        min_samples: int = 8,
        max_age: float = 600.0,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 < percentile <= 1.0:
            raise ValueError(f"percentile must be in (0, 1], got {percentile}")
        if not factor >= 1.0 or not floor >= 0.0 or not max_age > 0.0:
            raise ValueError("need factor >= 1, floor >= 0 and max_age > 0")
        if not 1 <= min_samples <= window or max_keys < 1:
            raise ValueError("need 1 <= min_samples <= window and max_keys >= 1")
        self.percentile = float(percentile)
        self.factor = float(factor)
        self.floor = float(floor)
        self.window = int(window)
        self.min_samples = int(min_samples)
        self.max_age = float(max_age)
        self.max_keys = int(max_keys)
        self.clock = clock
        self._lock = threading.Lock()
        self._keys: OrderedDict[str, _History] = OrderedDict()

    # ------------------------------------------------------------------ recording
    def _history(self, key: str) -> _History:
        """The key's history, created if new and marked most recently used (lock held)."""
        h = self._keys.pop(key, None)
        if h is None:
            h = _History(deque(maxlen=self.window))
        self._keys[key] = h
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        return h

    def observe(self, key: str, seconds: float) -> None:
        """Record an answered call's round trip; clears the key's timeout backoff."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        now = self.clock()
        with self._lock:
            h = self._history(key)
            h.samples.append((now, float(seconds)))
            h.backoff = 0.0

    def observe_timeout(self, key: str, seconds: float) -> None:
        """Record a call that got no answer within ``seconds``: a censored sample, and the
        next deadline for this key at least ``2 * seconds``."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        now = self.clock()
        with self._lock:
            h = self._history(key)
            h.samples.append((now, float(seconds)))
            h.backoff = max(h.backoff, 2.0 * seconds)

    # ------------------------------------------------------------------ reading
    def _recent(self, h: _History, now: float) -> list[float]:
        while h.samples and now - h.samples[0][0] > self.max_age:
            h.samples.popleft()
        return [s for _t, s in h.samples]

    def estimate(self, key: str) -> float | None:
        """The ``percentile`` of the key's recent latencies (nearest rank), or None when it
        has fewer than ``min_samples`` of them."""
        now = self.clock()
        with self._lock:
            h = self._keys.get(key)
            recent = self._recent(h, now) if h is not None else []
        if len(recent) < self.min_samples:
            return None
        recent.sort()
        rank = max(1, math.ceil(self.percentile * len(recent)))
        return recent[rank - 1]

    def deadline(self, key: str, configured: float) -> float:
        """Seconds the next call to ``key`` should wait: ``configured`` without enough
        history, else ``min(configured, max(floor, factor * estimate, backoff))``."""
        estimate = self.estimate(key)
        with self._lock:
            h = self._keys.get(key)
            backoff = h.backoff if h is not None else 0.0
        if estimate is None:
            return configured
        return min(configured, max(self.floor, self.factor * estimate, backoff))

    def snapshot(self) -> dict[str, dict[str, float | int | None]]:
        """key -> {"samples", "estimate", "backoff"} (for logs and status views)."""
        with self._lock:
            keys = list(self._keys)
        out: dict[str, dict[str, float | int | None]] = {}
        for key in keys:
            est = self.estimate(key)
            with self._lock:
                h = self._keys.get(key)
                n, backoff = (len(h.samples), h.backoff) if h is not None else (0, 0.0)
            out[key] = {"samples": n, "estimate": est, "backoff": backoff}
        return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)


def endpoint_key(transport: object, op: str) -> str:
    """A stable key for (server, op): the transport's ``endpoint`` (ZmqTransport) or
    ``peer_id`` (libp2p, MeasuredTransport), else the transport object's identity."""
    ident = getattr(transport, "endpoint", None) or getattr(transport, "peer_id", None)
    if ident is None:
        ident = f"{type(transport).__name__}@{id(transport):x}"
    return f"{ident}|{op}"


_default: LatencyTracker | None = None
_default_lock = threading.Lock()


def default_tracker() -> LatencyTracker:
    """The process-wide tracker that ``RemoteExpert`` uses unless given its own (so that
    every proxy of one server, however short-lived, shares what was learnt about it)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = LatencyTracker()
        return _default

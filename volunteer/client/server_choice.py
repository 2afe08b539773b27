"""Choosing a server among several for one uid: by what the client measured, not only by
what the server says about itself.

A record's ``load`` is a number the server reports about itself; a liar can always claim 0
and draw every trainer to it. So the choice rests on client-side measurements per server
(peer id): an EWMA of the latency of answered requests (a timeout counts the time it took),
and decayed counts of successes, errors and timeouts. The score (lower is better, roughly
"expected seconds per request") is

    latency * (1 + LOAD_WEIGHT * load) * (1 + FAIL_WEIGHT * failure rate)

with ``load`` clamped to [0, 1]: a server claiming load 0 gains at most a factor
``1 + LOAD_WEIGHT`` over one claiming 1, never more. Servers never measured get the median
latency of the measured candidates (so they are tried), and old measurements fade towards
that median with ``half_life`` (so a server that was slow once is tried again later).
``choose`` picks at random among the near-equals (cost within ``near`` x the best),
weighted by 1/cost: one liar cannot attract all the traffic, and equal servers share it.

``MeasuredTransport`` wraps a ``Transport`` and records the outcome of every request it
carries: latency on success, an error on failure or on an error reply that blames the
server (overloaded, internal, draining, ...), a timeout with its elapsed time.

A "paused" reply (the volunteer paused itself: ``volunteer pause``, a schedule, battery,
...) is neither: the server is not broken and its fast refusal says nothing about its
speed. It marks the server *unavailable* for ``UNAVAILABLE_S`` (or until it answers a
request again): ``choose`` passes over unavailable servers while any other candidate is
left, so the trainer's next lookup, and a retry of the same call
(``dispatch.CallPlan.reroute``), go to another replica. Its record says "paused" within a
heartbeat, after which directories skip it anyway.
"""

from __future__ import annotations

import math
import random
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import msgpack

from volunteer.wire.errors import RemoteTimeoutError

if TYPE_CHECKING:
    from volunteer.net.record_fields import ServerEntry
    from volunteer.wire.transport import Transport

DEFAULT_LATENCY = 0.05  # seconds: the prior when no candidate was measured yet
MIN_LATENCY = 1e-4
LOAD_WEIGHT = 0.5  # a self-reported load moves the cost by at most this factor (+1)
FAIL_WEIGHT = 4.0  # a server failing every request costs 5x one that never fails
NEAR = 1.5  # candidates within this factor of the best share the traffic
HALF_LIFE = 60.0  # seconds for counts to halve and a latency to fade halfway to the prior
EWMA_ALPHA = 0.3
MAX_TRACKED = 4096  # servers remembered (least recently measured forgotten first)
MAX_PEEK_BYTES = 4096
# Error replies that say the server, not the request, failed.
SERVER_FAULTS = frozenset({"overloaded", "internal", "draining", "unknown_expert",
                           "deadline_expired"})
# Error replies that say the server takes no work for now, through no fault of its own.
UNAVAILABLE_CODES = frozenset({"paused"})
UNAVAILABLE_S = 30.0  # a paused server is passed over this long (or until it answers again)


@dataclass(frozen=True)
class ServerMeasure:
    """What the client measured of one server (counts decayed to ``updated``)."""

    latency: float | None = None
    successes: float = 0.0
    errors: float = 0.0
    timeouts: float = 0.0
    updated: float = 0.0

    def failure_rate(self) -> float:
        """Failures over requests, smoothed by one imaginary success."""
        bad = self.errors + self.timeouts
        return bad / (self.successes + bad + 1.0)


class ServerScores:
    """Thread-safe per-server measurements and the choice among candidates."""

    def __init__(self, *, half_life: float = HALF_LIFE, alpha: float = EWMA_ALPHA,
                 load_weight: float = LOAD_WEIGHT, fail_weight: float = FAIL_WEIGHT,
                 near: float = NEAR, max_tracked: int = MAX_TRACKED,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.half_life = half_life
        self.alpha = alpha
        self.load_weight = load_weight
        self.fail_weight = fail_weight
        self.near = near
        self.max_tracked = max_tracked
        self.clock = clock
        self._lock = threading.Lock()
        self._servers: OrderedDict[str, ServerMeasure] = OrderedDict()
        self._unavailable: OrderedDict[str, float] = OrderedDict()  # peer id -> until (clock)

    # ------------------------------------------------------------------ measuring
    def _decayed(self, m: ServerMeasure, now: float) -> ServerMeasure:
        k = 0.5 ** (max(0.0, now - m.updated) / self.half_life)
        return replace(m, successes=m.successes * k, errors=m.errors * k,
                       timeouts=m.timeouts * k, updated=now)

    def _update(self, peer_id: str, *, latency: float | None = None, success: float = 0.0,
                error: float = 0.0, timeout: float = 0.0) -> None:
        now = self.clock()
        with self._lock:
            m = self._decayed(self._servers.pop(peer_id, ServerMeasure(updated=now)), now)
            lat = m.latency
            if latency is not None and math.isfinite(latency):
                latency = max(MIN_LATENCY, latency)
                lat = latency if lat is None else (1 - self.alpha) * lat + self.alpha * latency
            self._servers[peer_id] = replace(m, latency=lat, successes=m.successes + success,
                                             errors=m.errors + error,
                                             timeouts=m.timeouts + timeout)
            while len(self._servers) > self.max_tracked:
                self._servers.popitem(last=False)

    def record_success(self, peer_id: str, latency: float) -> None:
        with self._lock:
            self._unavailable.pop(peer_id, None)
        self._update(peer_id, latency=latency, success=1.0)

    def record_unavailable(self, peer_id: str, seconds: float = UNAVAILABLE_S) -> None:
        """``peer_id`` takes no work for now (it answered "paused"): not a failure, not a
        latency; ``choose`` passes over it for ``seconds`` while others are left."""
        now = self.clock()
        with self._lock:
            self._unavailable.pop(peer_id, None)
            self._unavailable[peer_id] = now + max(0.0, seconds)
            while self._unavailable and (len(self._unavailable) > self.max_tracked
                                         or next(iter(self._unavailable.values())) <= now):
                self._unavailable.popitem(last=False)

    def available(self, peer_id: str) -> bool:
        """False while ``peer_id`` is marked unavailable (``record_unavailable``)."""
        with self._lock:
            until = self._unavailable.get(peer_id)
        return until is None or until <= self.clock()

    def record_error(self, peer_id: str) -> None:
        self._update(peer_id, error=1.0)

    def record_timeout(self, peer_id: str, elapsed: float) -> None:
        self._update(peer_id, latency=elapsed, timeout=1.0)

    def measure(self, peer_id: str) -> ServerMeasure | None:
        """The counts of ``peer_id`` decayed to now, ``updated`` = when it was last measured
        (None if never measured)."""
        with self._lock:
            m = self._servers.get(peer_id)
        return None if m is None else replace(self._decayed(m, self.clock()), updated=m.updated)

    # ------------------------------------------------------------------ scoring
    def prior(self, peer_ids: Sequence[str]) -> float:
        """Median measured latency of ``peer_ids`` (DEFAULT_LATENCY when none measured)."""
        lats = [m.latency for p in peer_ids
                if (m := self.measure(p)) is not None and m.latency is not None]
        return statistics.median(lats) if lats else DEFAULT_LATENCY

    def score(self, peer_id: str, reported_load: float, prior: float = DEFAULT_LATENCY) -> float:
        """Expected cost of a request to ``peer_id`` (lower is better; see module docstring)."""
        load = min(max(reported_load, 0.0), 1.0) if math.isfinite(reported_load) else 1.0
        m = self.measure(peer_id)
        latency, fail = prior, 0.0
        if m is not None:
            if m.latency is not None:
                w = 0.5 ** (max(0.0, self.clock() - m.updated) / self.half_life)
                latency = w * m.latency + (1 - w) * prior
            fail = m.failure_rate()
        latency = max(MIN_LATENCY, latency)
        return latency * (1 + self.load_weight * load) * (1 + self.fail_weight * fail)

    def choose(self, candidates: Sequence[ServerEntry],
               rng: random.Random | None = None) -> ServerEntry | None:
        """One of ``candidates``: random among the near-equals, weighted by 1/cost; servers
        marked unavailable only when no other candidate is left."""
        if not candidates:
            return None
        candidates = [e for e in candidates if self.available(e.peer_id)] or list(candidates)
        prior = self.prior([e.peer_id for e in candidates])
        costs = [self.score(e.peer_id, e.load, prior) for e in candidates]
        best = min(costs)
        near = [(e, c) for e, c in zip(candidates, costs, strict=True) if c <= best * self.near]
        weights = [1.0 / c for _e, c in near]
        return (rng or random).choices([e for e, _c in near], weights=weights)[0]

    def snapshot(self) -> dict[str, dict[str, float | None]]:
        """peer id -> decayed measurements (for a status view)."""
        with self._lock:
            peers = list(self._servers)
        out: dict[str, dict[str, float | None]] = {}
        for p in peers:
            m = self.measure(p)
            if m is not None:
                out[p] = {"latency": m.latency, "successes": round(m.successes, 3),
                          "errors": round(m.errors, 3), "timeouts": round(m.timeouts, 3)}
        return out


def error_reply_code(frames: Sequence[Any]) -> str | None:
    """The code of a small one-frame error reply, "garbage" for an unreadable one, else None.

    Only a peek (replies with tensors are never decoded here): enough to see a server that
    answers every request at once with "overloaded" or garbage instead of a result.
    """
    if len(frames) != 1:
        return None
    frame = frames[0]
    try:
        size = memoryview(frame).nbytes
    except TypeError:
        return "garbage"
    if size > MAX_PEEK_BYTES:
        return None
    try:
        header = msgpack.unpackb(bytes(frame), raw=False, max_str_len=MAX_PEEK_BYTES,
                                 max_bin_len=MAX_PEEK_BYTES, max_array_len=64, max_map_len=64)
    except Exception:
        return "garbage"
    if not isinstance(header, dict):
        return "garbage"
    if header.get("op") != "error":
        return None
    code = header.get("code")
    return code if isinstance(code, str) else "garbage"


class MeasuredTransport:
    """A ``Transport`` that records every request's outcome in ``ServerScores``."""

    def __init__(self, inner: Transport, peer_id: str, scores: ServerScores,
                 clock: Callable[[], float] | None = None) -> None:
        self.inner = inner
        self.peer_id = peer_id
        self.scores = scores
        self.clock = clock or scores.clock

    def request(self, frames: Sequence[Any], timeout: float) -> list:
        t0 = self.clock()
        try:
            reply = self.inner.request(frames, timeout)
        except RemoteTimeoutError:
            self.scores.record_timeout(self.peer_id, self.clock() - t0)
            raise
        except Exception:
            self.scores.record_error(self.peer_id)
            raise
        code = error_reply_code(reply)
        if code in UNAVAILABLE_CODES:
            self.scores.record_unavailable(self.peer_id)
        elif code is not None and (code in SERVER_FAULTS or code == "garbage"):
            self.scores.record_error(self.peer_id)
        else:
            self.scores.record_success(self.peer_id, self.clock() - t0)
        return reply

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"MeasuredTransport({self.peer_id[-8:]}: {self.inner!r})"

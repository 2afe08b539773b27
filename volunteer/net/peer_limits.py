"""Per-peer fairness: a request rate and a number of concurrent requests per remote peer.

``PeerLimits`` (frozen) holds the bounds, with their defaults in this one place; servers
(``RpcServer``, the DHT guard of ``dht_guard.py``) take one and build a ``PeerLimiter``.

- **Rate**: a token bucket per peer (``requests_per_s`` refill, ``burst`` capacity). A
  request that finds the bucket empty is refused at once (the caller answers it with a typed
  "overloaded" error or resets the stream); it never waits, so a flooding peer cannot make
  the server queue work on its behalf.
- **Concurrency**: at most ``max_concurrent`` requests of one peer in flight at a time
  (``try_enter`` / ``leave``), across all its streams.
- **Memory**: at most ``max_peers`` peers are tracked. Beyond that the least recently seen
  peer with nothing in flight is forgotten (it comes back with a full bucket, which is no
  worse than a fresh key: keys are free); when every tracked peer has requests in flight,
  a new peer is refused until one finishes. The table never grows past ``max_peers``.

Time comes from ``time.monotonic`` (or an injected clock, for tests): no timers, no tasks.
Used from one thread at a time (the trio thread); not locked.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class PeerLimits:
    """Bounds per remote peer (see module docstring) and on the reads of its streams.

    ``idle_timeout_s``: a stream that starts no new message for this long is closed.
    ``read_timeout_s`` + ``bytes / min_read_rate``: deadline for the rest of a message once
    its first byte arrived (a slow sender cannot hold buffers or budget indefinitely).
    """

    requests_per_s: float = 1000.0
    burst: int = 2000
    max_concurrent: int = 256
    max_peers: int = 4096
    idle_timeout_s: float = 300.0
    read_timeout_s: float = 30.0
    min_read_rate: int = 1 << 20  # bytes/s a sender must sustain while a message is read

    def __post_init__(self) -> None:
        if not self.requests_per_s > 0 or self.burst < 1:
            raise ValueError("PeerLimits: requests_per_s must be > 0 and burst >= 1")
        for name in ("max_concurrent", "max_peers", "min_read_rate"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PeerLimits.{name} must be >= 1")
        if not (self.idle_timeout_s > 0 and self.read_timeout_s > 0):
            raise ValueError("PeerLimits: timeouts must be > 0")

    def read_deadline_s(self, nbytes: int) -> float:
        """Seconds allowed to read ``nbytes`` once a message has started."""
        return self.read_timeout_s + max(0, nbytes) / self.min_read_rate


DEFAULT_PEER_LIMITS = PeerLimits()
"""Expert RPC (``RpcServer``): requests per peer over all its streams (a libp2p call costs
~2.5 ms of the trio thread, so 1000/s is about what one peer can use; shard downloads ask
for 1 MiB chunks, ~100/s)."""

DHT_PEER_LIMITS = PeerLimits(requests_per_s=200.0, burst=1000, max_concurrent=6,
                             idle_timeout_s=15.0, read_timeout_s=10.0, min_read_rate=64 * 1024)
"""Kademlia (``dht_guard``): messages per peer; ``max_concurrent`` counts its open KAD
streams (``DhtSessions`` keeps <= 3 busy + 2 idle per peer)."""

SHARD_PEER_LIMITS = PeerLimits(requests_per_s=200.0, burst=400, max_concurrent=16,
                               min_read_rate=256 * 1024)
"""Per peer: a downloader asks each holder for ``volunteer.net.shard_download.PER_SOURCE`` (2) chunks at a
time per shard, so 16 concurrent requests leave room for 8 shards at once; 200 requests/s
is 200 MiB/s of 1 MiB chunks. ``min_read_rate`` also sets the reply-write deadline
(30 s + size / 256 KiB/s: 34 s for a 1 MiB chunk, enough for a relayed path)."""


class _PeerState:
    __slots__ = ("inflight", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.inflight = 0


@dataclass
class PeerLimiterStats:
    """Counters of refusals (by reason) and forgotten peers."""

    admitted: int = 0
    rate_limited: int = 0
    concurrency_limited: int = 0
    table_full: int = 0
    evicted: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class PeerLimiter:
    """Token bucket + in-flight count per peer, for at most ``max_peers`` peers."""

    def __init__(self, limits: PeerLimits = DEFAULT_PEER_LIMITS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._peers: OrderedDict[Hashable, _PeerState] = OrderedDict()
        self.stats = PeerLimiterStats()

    def __len__(self) -> int:
        return len(self._peers)

    def inflight(self, peer: Hashable) -> int:
        st = self._peers.get(peer)
        return st.inflight if st is not None else 0

    def try_enter(self, peer: Hashable) -> str | None:
        """Admit one request of ``peer`` (takes a token and a concurrency slot); ``None`` when
        admitted, else why not ("rate", "concurrency" or "peers"). Pair with ``leave``."""
        st = self._state(peer)
        if st is None:
            self.stats.table_full += 1
            return "peers"
        self._refill(st)
        if st.inflight >= self.limits.max_concurrent:
            self.stats.concurrency_limited += 1
            return "concurrency"
        if st.tokens < 1.0:
            self.stats.rate_limited += 1
            return "rate"
        st.tokens -= 1.0
        st.inflight += 1
        self.stats.admitted += 1
        return None

    def take_token(self, peer: Hashable) -> bool:
        """One more request of ``peer`` without a concurrency slot (e.g. the next message on
        a stream it was admitted with): True when its bucket had a token."""
        st = self._state(peer)
        if st is None:
            self.stats.table_full += 1
            return False
        self._refill(st)
        if st.tokens < 1.0:
            self.stats.rate_limited += 1
            return False
        st.tokens -= 1.0
        self.stats.admitted += 1
        return True

    def leave(self, peer: Hashable) -> None:
        """One admitted request of ``peer`` is done (its reply went out or it was dropped)."""
        st = self._peers.get(peer)
        if st is not None and st.inflight > 0:
            st.inflight -= 1

    def _refill(self, st: _PeerState) -> None:
        now = self._clock()
        lim = self.limits
        st.tokens = min(float(lim.burst), st.tokens + (now - st.stamp) * lim.requests_per_s)
        st.stamp = now

    def _state(self, peer: Hashable) -> _PeerState | None:
        st = self._peers.get(peer)
        if st is not None:
            self._peers.move_to_end(peer)
            return st
        if len(self._peers) >= self.limits.max_peers and not self._evict_one():
            return None
        st = self._peers[peer] = _PeerState(float(self.limits.burst), self._clock())
        return st

    def _evict_one(self) -> bool:
        """Forget the least recently seen peer with nothing in flight."""
        for peer, st in self._peers.items():  # oldest first
            if st.inflight == 0:
                del self._peers[peer]
                self.stats.evicted += 1
                return True
        return False


def refusal_message(reason: str, limits: PeerLimits) -> str:
    """Human text for a ``try_enter`` refusal (goes into the typed error's message)."""
    if reason == "rate":
        return (f"rate limited: more than {limits.requests_per_s:g} requests/s "
                f"(burst {limits.burst}) from this peer; slow down or retry elsewhere")
    if reason == "concurrency":
        return (f"too many requests in flight from this peer (max {limits.max_concurrent}); "
                "wait for replies")
    return "too many peers are being served; retry later or elsewhere"

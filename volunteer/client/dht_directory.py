"""``DhtDirectory``: the CONTRACT ``ExpertDirectory`` over the DHT expert registry.

- ``children(prefixes)``: one DHT lookup per prefix query (all concurrent), the union of
  the next coordinates of *serving* servers (a record that says "draining" or "paused" is
  passed over: that volunteer is leaving, or paused by its owner or a resource rule).
- ``resolve(uids)``: reads the value of each uid's parent prefix (the one beam search just
  read for its last dimension, so usually a cache hit), keeps the serving servers that
  host the uid, and picks one by ``server_choice.ServerScores``: what this client measured
  of each server (latency, errors, timeouts) combined with the load it reports about
  itself, capped, at random among near-equals (so no liar draws all the traffic, and
  trainers spread over equal servers). Every transport it returns is a
  ``MeasuredTransport`` that feeds those scores with the outcome of each request (a
  "paused" reply marks its server unavailable, so the next resolve picks another replica
  before the record saying "paused" reaches this trainer). The transport is ZeroMQ to the server's direct endpoint when
  its record says it is publicly reachable, falling back to libp2p by itself if ZeroMQ
  cannot connect (``FallbackTransport``), else a ``Libp2pTransport`` (direct,
  hole-punched or relayed: the node decides).
- Lookups are cached for ``cache_ttl`` seconds (default 3 s) per prefix, so a beam search
  and the dispatch right after it cost one round of lookups per dimension. Transports are
  cached per server and reused. ``invalidate(uids)`` drops the cached lookups that could
  offer those uids (RemoteMixtureOfExperts calls it when an expert is draining or gone).
- ``admit`` (optional): the experiment's admission filter; entries it refuses are dropped
  and counted ("not_admitted") in ``stats`` (default ``records.STATS``).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from volunteer.client.server_choice import MeasuredTransport, ServerScores
from volunteer.client.zmq_transport import ZmqTransport
from volunteer.net import records
from volunteer.net.records import Admit, RecordStats, ServerEntry
from volunteer.wire.errors import RemoteTimeoutError, UnreachableError

if TYPE_CHECKING:
    from volunteer.client.node import ClientNode
    from volunteer.wire.transport import Transport


def best_server(entries: Sequence[ServerEntry], child: str,
                rng: random.Random | None = None,
                scores: ServerScores | None = None) -> ServerEntry | None:
    """A serving entry hosting ``child``, chosen by ``scores`` (measurements + capped load,
    random among near-equals; without measurements, by the capped load alone)."""
    cands = [e for e in entries if e.state == "serving" and child in e.children]
    return (scores or ServerScores()).choose(cands, rng)


EMPTY_CACHE_TTL = 0.5
"""Seconds an empty lookup result is reused (a full one: ``cache_ttl``)."""


class DhtDirectory:
    """ExpertDirectory backed by a ``ClientNode`` (see module docstring).

    ``client``: the trainer's ``ClientNode`` (its DHT lookups and libp2p transports).
    ``cache_ttl``: seconds a prefix lookup is reused (3 s: one beam search and its dispatch
    cost one round of lookups per dimension); lower it only when servers come and go faster
    than that. ``prefer_zmq``: dial publicly reachable servers over ZeroMQ (faster; False
    forces libp2p everywhere, e.g. behind a firewall that blocks outgoing ZeroMQ ports).
    ``scores``: the ``ServerScores`` shared by every directory of one trainer (pass one to
    share what was measured). ``admit``: the closed experiment's admission filter (records it
    refuses are dropped). ``stats``: where dropped records are counted (default
    ``records.STATS``). ``rng``: the random source of server choice (tests pass a seeded one).
    """

    def __init__(self, client: ClientNode, cache_ttl: float = 3.0, prefer_zmq: bool = True, *,
                 scores: ServerScores | None = None, admit: Admit | None = None,
                 stats: RecordStats | None = None, rng: random.Random | None = None) -> None:
        self.client = client
        self.cache_ttl = cache_ttl
        self.prefer_zmq = prefer_zmq
        self.scores = scores or ServerScores()
        self.admit = admit
        self.stats = records.STATS if stats is None else stats
        self.rng = rng
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, list[ServerEntry]]] = {}
        self._transports: dict[tuple[str, str], Transport] = {}
        self.lookups = 0

    def _entries(self, prefixes: Sequence[str]) -> dict[str, list[ServerEntry]]:
        now = time.monotonic()
        out: dict[str, list[ServerEntry]] = {}
        with self._lock:
            for p in prefixes:
                hit = self._cache.get(p)
                # An empty answer may be a lookup that failed or came too early (the servers'
                # first announce, a rate-limited DHT peer): it is trusted only briefly.
                ttl = self.cache_ttl if hit and hit[1] else min(self.cache_ttl, EMPTY_CACHE_TTL)
                if hit is not None and now - hit[0] < ttl:
                    out[p] = hit[1]
        missing = [p for p in dict.fromkeys(prefixes) if p not in out]
        if missing:
            found = self.client.lookup(missing)
            self.lookups += len(missing)
            admitted = {p: [e for e in found.get(p, []) if self._admitted(e)] for p in missing}
            with self._lock:
                for p in missing:
                    self._cache[p] = (time.monotonic(), admitted[p])
                    out[p] = admitted[p]
        wall = time.time()
        return {p: [e for e in es if e.alive(wall)] for p, es in out.items()}

    def _admitted(self, entry: ServerEntry) -> bool:
        if self.admit is None:
            return True
        try:
            ok = bool(self.admit(entry))
        except Exception:  # the filter reads peer bytes: any failure refuses
            ok = False
        if not ok:
            self.stats.count("not_admitted")
        return ok

    def children(self, prefixes: Sequence[str]) -> dict[str, list[int]]:
        """For each prefix query, the next coordinates some *serving* server announces."""
        found = self._entries(list(prefixes))
        out: dict[str, list[int]] = {}
        for p in prefixes:
            coords = {int(c) for e in found[p] if e.state == "serving"
                      for c in e.children if c.isdigit()}
            out[p] = sorted(coords)
        return out

    def resolve(self, uids: Sequence[str]) -> dict[str, Transport]:
        """A transport to the best-scored serving server of each uid (unserved uids left out)."""
        pairs = {}
        for uid in uids:
            try:
                pairs[uid] = records.parent_pair(uid)
            except ValueError:
                continue
        found = self._entries([p for p, _c in pairs.values()])
        out: dict[str, Transport] = {}
        for uid, (prefix, child) in pairs.items():
            entry = best_server(found[prefix], child, self.rng, self.scores)
            if entry is not None:
                out[uid] = self.transport_for(entry)
        return out

    def transport_for(self, entry: ServerEntry) -> Transport:
        """The cached transport to ``entry``'s server: ZeroMQ with libp2p fallback when it is
        public and ``prefer_zmq``, else libp2p; measured for ``scores``."""
        use_zmq = bool(self.prefer_zmq and entry.zmq and entry.reachability == "public")
        key = (entry.peer_id, entry.zmq if use_zmq else "libp2p")
        with self._lock:
            cached = self._transports.get(key)
        if cached is not None:
            return cached
        transport: Any = self.client.transport(entry.peer_id, entry.addrs)
        if use_zmq:
            zmq = _zmq_transport(entry.zmq)  # type: ignore[arg-type]
            if zmq is not None:
                transport = FallbackTransport(zmq, transport)
        transport = MeasuredTransport(transport, entry.peer_id, self.scores)
        with self._lock:
            transport = self._transports.setdefault(key, transport)
        return transport

    def invalidate(self, uids: Sequence[str] | None = None) -> None:
        """Forget cached lookups: all of them, or those that could offer one of ``uids``.

        A trainer calls this when experts answered "draining", "paused", "unknown_expert" or were
        unreachable: the lookups of every prefix above them (``"p."``, ``"p.3."`` for
        ``"p.3.7"``) are read again from the DHT on next use, so a volunteer that just left
        is not offered again for the rest of the cache lifetime.
        """
        with self._lock:
            if uids is None:
                self._cache.clear()
                return
            stale = {q for uid in uids for q in _prefix_queries(uid)}
            for query in stale & self._cache.keys():
                del self._cache[query]

    def close(self) -> None:
        """Close every transport this directory opened."""
        with self._lock:
            transports, self._transports = list(self._transports.values()), {}
        for t in transports:
            try:
                t.close()
            except Exception:
                pass


class FallbackTransport:
    """ZeroMQ first; if it cannot reach the server (``UnreachableError``: e.g. the ZeroMQ
    port is firewalled although the libp2p port is public), libp2p, within the same call's
    deadline (the fallback gets only the time left, so a call never takes twice its
    timeout). After a failover the primary is tried again every ``retry_primary_s``, so one
    connection reset does not send a server over the slower path for good."""

    retry_primary_s = 30.0

    def __init__(self, primary: Transport, fallback: Transport,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.primary = primary
        self.fallback = fallback
        self.clock = clock
        self.failed_over = False
        self._retry_at = 0.0

    def request(self, frames: Sequence[Any], timeout: float) -> list:
        start = self.clock()
        if not self.failed_over or start >= self._retry_at:
            try:
                out = self.primary.request(frames, timeout)
                self.failed_over = False
                return out
            except UnreachableError:
                self.failed_over = True
                self._retry_at = self.clock() + self.retry_primary_s
        left = timeout - (self.clock() - start)
        if left <= 0:
            raise RemoteTimeoutError(f"no time left for the libp2p fallback after {timeout:.1f} s")
        return self.fallback.request(frames, left)

    def close(self) -> None:
        for t in (self.primary, self.fallback):
            try:
                t.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        return f"FallbackTransport({self.primary!r} -> {self.fallback!r})"


def _prefix_queries(uid: str) -> list[str]:
    """Every prefix query a lookup of ``uid`` can go through: "p.3.7" -> ["p.", "p.3."]."""
    parts = uid.split(".")
    return [".".join(parts[:n]) + "." for n in range(1, len(parts))]


def _zmq_transport(endpoint: str) -> Any:
    return ZmqTransport(endpoint)

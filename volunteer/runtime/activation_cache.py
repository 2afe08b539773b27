"""Bounded cache of forward graphs, so that a backward need not recompute its forward.

A forward flagged "will backward" runs with autograd and its graph is stored here, keyed by
``(uid, forward request id)`` for each request merged into that batch (a graph may serve
several requests: rows ``start:end`` belong to one request). A backward carrying the
forward's id finds the graph. Each graph is differentiated at most once (no
``retain_graph``): by the backward batch that holds all its remaining requests (rows of
requests already served get zero gradients); requests arriving before their siblings are
recomputed from the graph's stored inputs instead, so they never need the client's inputs.
On a miss (evicted, expired, never flagged, inputs differ) the executor recomputes the
forward from the inputs the backward carries, or answers "cache_miss" if it carries none.

Bounds: ``max_entries`` graphs, ``max_bytes`` estimated activation bytes and ``ttl_s`` age;
the oldest graphs are evicted first. ``max_entries == 0`` disables caching.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass

from volunteer.experts.backend import ForwardGraph


@dataclass(eq=False)
class CachedGraph:
    """One stored graph and the request rows it holds."""

    graph_id: int
    uid: str
    graph: ForwardGraph
    members: dict[int, tuple[int, int]]  # forward id -> (start, end) rows
    nbytes: int
    created: float


class ActivationCache:
    """LRU of ``CachedGraph`` bounded by count, bytes and age. Used by one thread only."""

    def __init__(self, max_entries: int, max_bytes: int, ttl_s: float) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._graphs: OrderedDict[int, CachedGraph] = OrderedDict()
        self._index: dict[tuple[str, int], int] = {}
        self._ids = itertools.count()
        self.nbytes = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._graphs)

    def put(
        self, uid: str, graph: ForwardGraph, members: dict[int, tuple[int, int]], nbytes: int
    ) -> bool:
        """Store a graph; False (not stored) when disabled or larger than the byte bound."""
        if not self.enabled or nbytes > self.max_bytes:
            return False
        now = time.monotonic()
        entry = CachedGraph(next(self._ids), uid, graph, dict(members), nbytes, now)
        for fid in members:
            old = self._index.get((uid, fid))
            if old is not None:  # a reused id replaces the old row mapping
                self.drop_member(old, uid, fid)
            self._index[(uid, fid)] = entry.graph_id
        self._graphs[entry.graph_id] = entry
        self.nbytes += nbytes
        self._evict(now)
        return entry.graph_id in self._graphs

    def lookup(self, uid: str, fid: int) -> tuple[CachedGraph, int, int] | None:
        """The graph holding request ``fid`` of ``uid`` and its rows, without removing it."""
        gid = self._index.get((uid, fid))
        if gid is None:
            return None
        entry = self._graphs.get(gid)
        if entry is None or time.monotonic() - entry.created > self.ttl_s:
            if entry is not None:
                self.pop(gid)
            return None
        start, end = entry.members[fid]
        return entry, start, end

    def pop(self, graph_id: int) -> CachedGraph | None:
        """Remove a graph (and all its members) from the cache."""
        entry = self._graphs.pop(graph_id, None)
        if entry is None:
            return None
        for fid in entry.members:
            if self._index.get((entry.uid, fid)) == graph_id:
                del self._index[(entry.uid, fid)]
        self.nbytes -= entry.nbytes
        return entry

    def clear(self) -> None:
        for gid in list(self._graphs):
            self.pop(gid)

    def drop_member(self, graph_id: int, uid: str, fid: int) -> None:
        """Forget request ``fid``'s rows of a graph (the graph goes when no member is left)."""
        entry = self._graphs.get(graph_id)
        if self._index.get((uid, fid)) == graph_id:
            del self._index[(uid, fid)]
        if entry is not None:
            entry.members.pop(fid, None)
            if not entry.members:
                self.pop(graph_id)

    def _evict(self, now: float) -> None:
        while self._graphs:
            gid, oldest = next(iter(self._graphs.items()))
            if (
                len(self._graphs) > self.max_entries
                or self.nbytes > self.max_bytes
                or now - oldest.created > self.ttl_s
            ):
                self.pop(gid)
                self.evictions += 1
            else:
                break

"""``Handouts``: the shards this node hands out, one (version, root) per hosted expert.

A shard is a snapshot: the expert's state copied under ``runtime.exclusive()`` (consistent
weights, optimizer state and update count; serving pauses for the memory copy only), then
encoded (``volunteer.experts.shard``) and written to the cache outside the lock. ``take``
re-encodes only the experts whose version (updates applied) changed since their last shard.
A downloaded shard becomes the handout as it is (``adopt``): it is already in the cache.

The last ``KEEP_ROOTS`` roots per uid stay pinned in the cache, so a newcomer that started
downloading a slightly older root can finish; older ones go when the cache's LRU needs room.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from typing import Any

from volunteer.experts.checkpoint import clone_state, non_finite_tensor
from volunteer.experts.shard import encode_shard
from volunteer.experts.shard_cache import ShardCache

log = logging.getLogger(__name__)

KEEP_ROOTS = 2


class Handouts:
    """uid -> (version, root) of the shard this node serves for it (see module docstring)."""

    def __init__(self, cache: ShardCache, fingerprint: str, chunk_bytes: int) -> None:
        self.cache = cache
        self.fingerprint = fingerprint
        self.chunk_bytes = chunk_bytes
        self.current: dict[str, tuple[int, bytes]] = {}
        self._revision: dict[str, int] = {}  # uid -> weights_revision of its current shard
        self._roots: dict[str, deque[bytes]] = {}

    def take(self, runtime: Any, force: bool = False) -> list[str]:
        """Snapshot every hosted expert whose version changed (all with ``force``); their uids."""
        states: dict[str, Any] = {}
        revisions: dict[str, int] = {}
        with runtime.exclusive():
            for uid, backend in runtime.backends.items():
                known = self.current.get(uid)
                revision = int(getattr(backend, "weights_revision", 0))  # replica averaging's pulls
                if (force or known is None or known[0] != int(backend.updates_applied)
                        or self._revision.get(uid, 0) != revision):
                    states[uid] = clone_state(backend.state_dict())
                    revisions[uid] = revision
        done = self.encode(states)
        for uid in done:
            self._revision[uid] = revisions[uid]
        return done

    def encode(self, states: Mapping[str, Any]) -> list[str]:
        """Encode the given (already copied) states into the cache and make them the handouts;
        returns the uids whose handout changed."""
        done: list[str] = []
        for uid, state in states.items():
            bad = non_finite_tensor(state)
            if bad is not None:  # hand out the last good shard, never NaN weights
                log.warning("not refreshing the shard of %s: non-finite values in %s", uid, bad)
                continue
            header, body = encode_shard(uid, self.fingerprint, state, self.chunk_bytes)
            self.cache.put_complete(header, body, verify=False)  # just encoded: hashes are ours
            self.adopt(uid, header.version, header.root)
            done.append(uid)
        if done:
            self.cache.evict(pinned=self.pinned())
        return done

    def adopt(self, uid: str, version: int, root: bytes) -> None:
        """Hand out ``root`` (complete in the cache) for ``uid`` from now on."""
        self.current = {**self.current, uid: (int(version), root)}
        self.pin(uid, root)

    def drop(self, uid: str) -> None:
        self.current = {k: v for k, v in self.current.items() if k != uid}
        self._revision.pop(uid, None)

    def pin(self, uid: str, root: bytes) -> None:
        """Keep ``root`` out of the cache's eviction (also a download in progress)."""
        roots = self._roots.setdefault(uid, deque(maxlen=KEEP_ROOTS))
        if root not in roots:
            roots.append(root)

    def pinned(self) -> set[bytes]:
        return {r for roots in list(self._roots.values()) for r in roots}

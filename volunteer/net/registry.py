"""Expert registry on the DHT: announce what this node serves, look up who serves what.

``ExpertRegistry`` (trio, one per node and experiment) turns "I serve these uids, in this
state, with this load, reachable here" into one signed entry per prefix query (see
``records.index_pairs``) and publishes them concurrently; it reads prefix values back as
verified ``ServerEntry`` lists. Prefixes that the node stopped serving are withdrawn by a
last entry with no children (a tombstone) that expires no earlier than the last entry this
node announced there: it carries a higher seq, so replaying the older entry loses to it for
as long as that entry could be alive. Readers ignore tombstones as servers.

Records are read under a ``RecordPolicy`` (default: the DHT's own, see
``dht_store.configure_dht``): the experiment's TTL bound, the admission filter, the stats
where drops are counted. Every lookup takes an optional ``admit`` filter that replaces the
policy's. ``admission_token`` (opaque bytes, from the experiment owner) goes into every
entry this node signs, so admitting readers and DHT servers keep them.

Each entry goes to the prefix's base key and to this node's shard key of it; a lookup reads
the base key, and all shard keys of a prefix whose base key is full (``key_shards.py``: a
hot prefix lists up to ``KEY_SHARDS x max_entries`` servers instead of one key's cap).

``children`` / ``servers`` are the two lookups a DMoE client needs; the caching, the
choice of the best server and the transports live in ``dht_directory.py``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import trio
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht.kad_dht import KadDHT

from volunteer.net import dht_store, key_shards, records
from volunteer.net.records import ServerEntry, ShardInfo

log = logging.getLogger(__name__)

DEFAULT_TTL = 60.0
HOLDER_LOOKUPS_AT_ONCE = 16
MAX_SHARDED_PREFIXES = 4096  # prefixes remembered as full (read with their shards at once)


def _fresher(a: tuple[ServerEntry, bytes], b: tuple[ServerEntry, bytes]) -> bool:
    return a[0].freshness() > b[0].freshness()


def _listed(found: Mapping[str, tuple[ServerEntry, bytes]], prefix: str) -> list[ServerEntry]:
    """The entries a lookup returns: live servers of ``prefix`` (withdrawals left out)."""
    return [e for e, _b in found.values() if not e.withdrawn and e.prefix == prefix]


@dataclass
class AnnounceReport:
    """How an announce went: per DHT key, how many DHT servers accepted the entry."""

    stored: dict[str, int] = field(default_factory=dict)

    @property
    def keys(self) -> int:
        return len(self.stored)

    @property
    def ok(self) -> bool:
        return all(n > 0 for n in self.stored.values())


def group_children(uids: Sequence[str]) -> dict[str, list[str]]:
    """prefix query -> sorted distinct children, over all index pairs of ``uids``."""
    out: dict[str, set[str]] = {}
    for uid in uids:
        for prefix, child in records.index_pairs(uid):
            out.setdefault(prefix, set()).add(child)
    return {p: sorted(c, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
            for p, c in out.items()}


class ExpertRegistry:
    """Announce and look up expert servers of one experiment over a KadDHT."""

    def __init__(self, dht: KadDHT, key_pair: KeyPair, experiment: str,
                 ttl: float = DEFAULT_TTL, *, policy: records.RecordPolicy | None = None,
                 admission_token: bytes | None = None) -> None:
        self.policy = policy or dht_store.policy_of(dht)
        if not 0 < ttl <= self.policy.max_ttl:
            raise ValueError(f"ttl must be in (0, {self.policy.max_ttl}]")
        if admission_token is not None and not 0 < len(admission_token) <= records.MAX_TOKEN_BYTES:
            raise ValueError(f"admission token must be 1-{records.MAX_TOKEN_BYTES} bytes")
        self.admission_token = admission_token
        self.dht = dht
        self.key_pair = key_pair
        self.experiment = experiment
        self.ttl = ttl
        self.peer_id = dht.host.get_id().to_base58()
        self._seq = 0
        self._announced: set[str] = set()
        self._expiry: dict[str, float] = {}  # prefix -> latest expiry announced there
        self.records_announced = 0
        self.shards_left_out: dict[str, int] = {}  # prefix -> shards that did not fit its entry
        self._sharded: set[str] = set()  # prefixes whose base key was full at the last lookup
        # prefix -> (base key full, this node listed there, when): steers announces' keys
        self._base_seen: dict[str, tuple[bool, bool, float]] = {}

    def _next_seq(self) -> int:
        self._seq = max(self._seq + 1, time.time_ns())
        return self._seq

    def make_entry(self, prefix: str, children: Sequence[str], *, state: str, load: float,
                   addrs: Sequence[str], zmq: str | None, reachability: str,
                   expires: float | None = None, shards: Sequence[ShardInfo] = (),
                   free: int = 0) -> bytes:
        load = float(load)
        entry = ServerEntry(
            experiment=self.experiment, prefix=prefix, peer_id=self.peer_id,
            seq=self._next_seq(),
            expires=time.time() + self.ttl if expires is None else expires,
            children=tuple(children), state=state,
            load=min(max(load, 0.0), records.MAX_LOAD) if math.isfinite(load) else records.MAX_LOAD,
            addrs=tuple(addrs)[: records.MAX_ADDRS], zmq=zmq, reachability=reachability,
            shards=tuple(shards), free=max(0, min(int(free), records.MAX_FREE_SLOTS)),
            token=self.admission_token,
        )
        blob = records.sign_entry(entry, self.key_pair.private_key)
        self._expiry[prefix] = max(self._expiry.get(prefix, 0.0), entry.expires)
        return blob

    async def announce(self, uids: Sequence[str], *, state: str = "serving", load: float = 0.0,
                       addrs: Sequence[str] = (), zmq: str | None = None,
                       reachability: str = "unknown",
                       report: AnnounceReport | None = None,
                       shards: Mapping[str, tuple[int, bytes]] | None = None,
                       free: int = 0) -> AnnounceReport:
        """Publish (or refresh) this node's entries for ``uids``; withdraw dropped prefixes.

        ``shards`` maps a hosted uid to the (version, root) of the shard this node hands out
        for it; it is filed in the entry of the uid's parent prefix. ``free`` is how many
        more experts this node would take. ``report`` (optional) is filled in place, so a
        caller that times the announce out still sees which prefixes were stored (0 = not yet).
        """
        if state not in records.STATES:
            raise ValueError(f"state must be one of {records.STATES}")
        groups = group_children(uids)
        by_prefix: dict[str, list[ShardInfo]] = {}
        for uid, (version, root) in (shards or {}).items():
            if uid in uids:
                prefix, child = records.parent_pair(uid)
                by_prefix.setdefault(prefix, []).append(ShardInfo(child, int(version), bytes(root)))
        jobs: list[tuple[str, bytes]] = []
        for prefix, children in groups.items():
            infos = sorted(by_prefix.get(prefix, []), key=lambda i: i.child)
            while True:  # an entry is bounded in bytes: many shards under one prefix may not fit
                try:
                    blob = self.make_entry(prefix, children, state=state, load=load, addrs=addrs, zmq=zmq,
                                           reachability=reachability, shards=infos, free=free)
                    break
                except ValueError:
                    if not infos:
                        raise
                    infos = infos[: len(infos) * 3 // 4]
            left_out = len(by_prefix.get(prefix, [])) - len(infos)
            if left_out and left_out != self.shards_left_out.get(prefix):  # said once per change
                log.warning("the DHT entry of %s holds the shards of %d of this node's %d experts there; the "
                            "others are served but not downloadable from this node", prefix, len(infos),
                            len(by_prefix[prefix]))
            if left_out:
                self.shards_left_out[prefix] = left_out
            else:
                self.shards_left_out.pop(prefix, None)
            jobs.append((prefix, blob))
        now = time.time()
        for prefix in sorted(self._announced - set(groups)):
            # Withdrawal: no children, draining, a higher seq, and it outlives every entry
            # announced there, so a replayed older entry loses to it while it could be alive.
            expires = max(self._expiry.get(prefix, 0.0), now + 1.0)
            blob = self.make_entry(prefix, (), state="draining", load=load, addrs=addrs, zmq=zmq,
                                   reachability=reachability, expires=expires)
            jobs.append((prefix, blob))
        for prefix in [p for p, t in self._expiry.items() if t < now and p not in groups]:
            del self._expiry[prefix]  # nothing announced there can be alive any more
        report = report if report is not None else AnnounceReport()
        report.stored.update({prefix: 0 for prefix, _blob in jobs})

        async def publish(prefix: str, key: str, blob: bytes) -> None:
            report.stored[prefix] += await dht_store.publish_value(
                self.dht, key, records.encode_value([blob]))

        async with trio.open_nursery() as nursery:
            for prefix, blob in jobs:
                # The base key (what readers of every version read) and this node's shard key
                # of the prefix (what lists it once the base key is full: see ``key_shards``).
                for key in key_shards.write_keys(
                        records.dht_key(self.experiment, prefix),
                        key_shards.writer_shard_key(self.experiment, prefix, self.peer_id),
                        self._base_seen.get(prefix), time.monotonic()):
                    nursery.start_soon(publish, prefix, key, blob)
        self._announced = set(groups)
        self.records_announced += len(jobs)
        return report

    async def lookup(self, prefix: str, admit: records.Admit | None = None) -> list[ServerEntry]:
        """Live verified entries under a prefix query (withdrawals and expired ones dropped).

        Reads the prefix's base key; when that is full, every shard key of it too (one more
        concurrent round of ``KEY_SHARDS`` lookups) and uses the union
        (``key_shards.combine``). A prefix seen full is read by its shard keys alone next
        time (one round; every writer of the new layout is there), until they hold less
        than a full key. ``admit`` (optional) replaces the policy's admission filter.
        """
        cap = self.policy.max_entries
        shards = key_shards.shard_keys(self.experiment, prefix)
        if prefix in self._sharded:
            found = await self._lookup_keys(shards, admit)
            merged = key_shards.union(list(found.values()), fresher=_fresher)
            if key_shards.is_full(len(merged), cap):
                return _listed(merged, prefix)
            self._sharded.discard(prefix)  # the swarm shrank: the base key lists everyone
        base_key = records.dht_key(self.experiment, prefix)
        base = (await self._lookup_keys([base_key], admit))[base_key]
        self._note_base(prefix, key_shards.is_full(len(base), cap), self.peer_id in base)
        reads: list[dict[str, tuple[ServerEntry, bytes]]] = []
        if key_shards.is_full(len(base), cap):
            reads = list((await self._lookup_keys(shards, admit)).values())
            if len(self._sharded) < MAX_SHARDED_PREFIXES:
                self._sharded.add(prefix)
        return _listed(key_shards.combine(base, reads, cap, fresher=_fresher), prefix)

    def _note_base(self, prefix: str, full: bool, listed: bool) -> None:
        """Remember what a read of ``prefix``'s base key showed (bounded: oldest dropped)."""
        self._base_seen.pop(prefix, None)
        if len(self._base_seen) >= MAX_SHARDED_PREFIXES:
            del self._base_seen[next(iter(self._base_seen))]
        self._base_seen[prefix] = (full, listed, time.monotonic())

    async def _lookup_keys(self, keys: Sequence[str], admit: records.Admit | None,
                           ) -> dict[str, dict[str, tuple[ServerEntry, bytes]]]:
        out: dict[str, dict[str, tuple[ServerEntry, bytes]]] = {}

        async def one(key: str) -> None:
            out[key] = await dht_store.lookup_value(self.dht, key, policy=self.policy, admit=admit)

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(one, key)
        return out

    async def children(self, prefixes: Sequence[str],
                       admit: records.Admit | None = None) -> dict[str, list[int]]:
        """For each prefix query, the integer next coordinates with a serving expert."""
        out: dict[str, list[int]] = {}

        async def one(prefix: str) -> None:
            entries = await self.lookup(prefix, admit)
            coords = {int(c) for e in entries if e.state == "serving"
                      for c in e.children if c.isdigit()}
            out[prefix] = sorted(coords)

        async with trio.open_nursery() as nursery:
            for p in dict.fromkeys(prefixes):
                nursery.start_soon(one, p)
        return out

    async def holders(self, uids: Sequence[str],
                      admit: records.Admit | None = None) -> dict[str, list[ServerEntry]]:
        """uid -> live entries (serving or draining) that list it, one lookup per parent prefix."""
        parents: dict[str, list[tuple[str, str]]] = {}
        for uid in dict.fromkeys(uids):
            prefix, child = records.parent_pair(uid)
            parents.setdefault(prefix, []).append((uid, child))
        out: dict[str, list[ServerEntry]] = {uid: [] for uid in dict.fromkeys(uids)}
        limiter = trio.CapacityLimiter(HOLDER_LOOKUPS_AT_ONCE)

        async def one(prefix: str) -> None:
            async with limiter:
                entries = await self.lookup(prefix, admit)
            for uid, child in parents[prefix]:
                out[uid] = [e for e in entries if child in e.children]

        async with trio.open_nursery() as nursery:
            for prefix in parents:
                nursery.start_soon(one, prefix)
        return out

    async def servers(self, uid: str, admit: records.Admit | None = None) -> list[ServerEntry]:
        """All live entries (serving or draining) of servers that host ``uid``."""
        prefix, child = records.parent_pair(uid)
        return [e for e in await self.lookup(prefix, admit) if child in e.children]

"""A simulated expert registry: the product's record code over in-memory DHT keys.

No sockets and no Kademlia (routing and lookups are ``dht_swarm.py``'s level): each DHT key
is one store, as the closest DHT servers of that key hold it when they agree. What runs is
the product's own code:

- writers build ``ServerEntry`` records for the prefixes ``registry.group_children`` gives
  their uids, sign them (``records.sign_entry``, real Ed25519 keys) and file them under the
  keys the layout says: the base key only (``sharded=False``: the layout before
  ``key_shards``), or the base key and the writer's shard key (``sharded=True``, as
  ``ExpertRegistry.announce`` does now);
- a DHT server validates a PUT with ``records.valid_entries`` (signature, bounds, key
  placement, TTL) and merges it with ``records.merge_entries`` under the per-key cap
  (``max_entries``; held entries win, newcomers are refused "key_full");
- a reader applies ``ExpertRegistry.lookup``'s rule (``lookup``): the base key, then every
  shard key when the base is full, combined by ``key_shards.combine``; a prefix it knows
  full by its shard keys alone; it reports how many keys it read, in how many sequential
  rounds, and the bytes of the entries they held.

``signed=False`` skips signing and validation (entries carry no blob) for long runs that
re-announce thousands of times (the assignment's coverage runs); merging, caps and reading
are the same code. Time is a plain float the caller passes (virtual seconds).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from volunteer.net import key_shards, records
from volunteer.net.records import RecordStats, ServerEntry, ShardInfo
from volunteer.net.registry import group_children

NEVER = 1e11  # expiry of entries whose writer is alive and refreshing (``signed=False`` only)


@dataclass
class SimWriter:
    """One simulated volunteer as the registry sees it: its key pair and peer id."""

    peer_id: str
    key_pair: KeyPair | None = None
    seq: int = 0
    reachability: str = "public"
    announced: set[str] = field(default_factory=set)  # prefixes its last announce filed

    @classmethod
    def make(cls, rng: random.Random, signed: bool, reachability: str = "public") -> SimWriter:
        """A writer with a fresh Ed25519 identity (``signed``) or a stand-in peer id."""
        if signed:
            kp = create_new_key_pair(rng.randbytes(32))
            return cls(ID.from_pubkey(kp.public_key).to_base58(), kp, reachability=reachability)
        alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
        return cls("12D3Koo" + "".join(rng.choice(alphabet) for _ in range(45)),
                   reachability=reachability)


@dataclass
class ReadCost:
    """What one reader's lookups cost: keys read, sequential rounds, and the bytes of the
    entries the keys held (one replica's answer; a reader asks ``REPLICATION`` of them)."""

    keys: int = 0
    rounds: int = 0
    entry_bytes: int = 0


@dataclass
class SimRegistry:
    """In-memory registry keys of one experiment (see module docstring)."""

    experiment: str
    sharded: bool
    signed: bool = True
    max_entries: int = records.MAX_ENTRIES_PER_KEY
    ttl: float = 60.0
    seed: int = 0
    stats: RecordStats = field(default_factory=RecordStats)
    store: dict[str, dict[str, tuple[ServerEntry, bytes]]] = field(default_factory=dict)
    puts: int = 0
    signatures: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    # -------------------------------------------------------------- writing

    def keys_for(self, prefix: str, peer_id: str, read: bool = False, now: float = 0.0) -> list[str]:
        """The keys a writer of this layout files its entry for ``prefix`` under
        (``key_shards.write_keys``). ``read``: the writer has read the prefix's base key (a
        daemon reads the parent prefix of every grid uid, never the grid's root), so what the
        store holds there steers its writes; otherwise it writes both keys."""
        base = records.dht_key(self.experiment, prefix)
        if not self.sharded:
            return [base]
        shard = key_shards.writer_shard_key(self.experiment, prefix, peer_id)
        seen = None
        if read:
            held = self.store.get(base, {})
            seen = (key_shards.is_full(len(held), self.max_entries), peer_id in held, now)
        return list(key_shards.write_keys(base, shard, seen, now))

    def announce(self, writer: SimWriter, uids: Sequence[str], now: float, *,
                 state: str = "serving", load: float = 0.0,
                 shards: dict[str, tuple[int, bytes]] | None = None, free: int = 0) -> int:
        """File ``writer``'s entries for ``uids`` (one per prefix query); returns how many
        (key, entry) PUTs were stored (the others were refused, counted in ``stats``)."""
        stored = 0
        groups = group_children(uids)
        parents = {records.parent_pair(u)[0] for u in uids}  # what the writer's daemon reads
        # prefixes no longer served get a withdrawal (no children), as ExpertRegistry sends
        jobs = list(groups.items()) + [(p, []) for p in sorted(writer.announced - set(groups))]
        writer.announced = set(groups)
        for prefix, children in jobs:
            infos = tuple(ShardInfo(records.parent_pair(u)[1], v, r)
                          for u, (v, r) in sorted((shards or {}).items())
                          if u in uids and records.parent_pair(u)[0] == prefix)
            writer.seq += 1
            entry = ServerEntry(
                experiment=self.experiment, prefix=prefix, peer_id=writer.peer_id,
                seq=writer.seq, expires=now + self.ttl if self.signed else NEVER,
                children=tuple(children), state=state if children else "draining", load=load,
                addrs=("/ip4/10.0.0.1/tcp/4001",), zmq=None, reachability=writer.reachability,
                shards=infos, free=free)
            blob = b""
            if self.signed:
                assert writer.key_pair is not None
                blob = records.sign_entry(entry, writer.key_pair.private_key)
                self.signatures += 1
            for key in self.keys_for(prefix, writer.peer_id, read=prefix in parents, now=now):
                stored += self.put(key, entry, blob, now)
        return stored

    def put(self, key: str, entry: ServerEntry, blob: bytes, now: float) -> bool:
        """A DHT server's PUT: validate (when signed), then the fair capped merge."""
        self.puts += 1
        if self.signed:
            incoming = records.valid_entries([records.encode_value([blob])], key=key, now=now,
                                             stats=self.stats)
        else:
            incoming = {entry.peer_id: (entry, blob)}
        if not incoming:
            return False
        held = self.store.get(key, {})
        merged = records.merge_entries(held, incoming, now=now, max_entries=self.max_entries,
                                       stats=self.stats, rng=self._rng)
        self.store[key] = merged
        held_now = merged.get(entry.peer_id)
        return held_now is not None and held_now[0].seq == entry.seq

    def kill(self, peer_id: str, now: float) -> None:
        """A writer vanishes without goodbye: its entries live out their TTL from its last
        refresh (drawn uniformly within one refresh period, ``ttl / 3``)."""
        for entries in self.store.values():
            held = entries.get(peer_id)
            if held is not None:
                left = self.ttl * (2 / 3 + self._rng.random() / 3)
                entries[peer_id] = (dataclasses.replace(held[0], expires=min(held[0].expires, now + left)),
                                    held[1])

    # -------------------------------------------------------------- reading

    def read_key(self, key: str, now: float) -> dict[str, tuple[ServerEntry, bytes]]:
        """The live entries one DHT key holds."""
        return {pid: eb for pid, eb in self.store.get(key, {}).items() if eb[0].alive(now)}

    def lookup(self, prefix: str, now: float, cost: ReadCost | None = None,
               known_full: set[str] | None = None) -> list[ServerEntry]:
        """Live entries under ``prefix`` by ``ExpertRegistry.lookup``'s rule (see module
        docstring); ``cost`` accumulates keys read, rounds and bytes; ``known_full`` is the
        reader's memory of prefixes seen full (read by their shard keys alone, one round)."""
        known = known_full if known_full is not None else set()
        fresher = _fresher
        shard_keys = key_shards.shard_keys(self.experiment, prefix)
        if self.sharded and prefix in known:
            reads = [self.read_key(k, now) for k in shard_keys]
            merged = key_shards.union(reads, fresher)
            self._charge(cost, len(reads), 1, reads)
            if key_shards.is_full(len(merged), self.max_entries):
                return _listed(merged, prefix)
            known.discard(prefix)
        base = self.read_key(records.dht_key(self.experiment, prefix), now)
        self._charge(cost, 1, 1, [base])
        reads = []
        if self.sharded and key_shards.is_full(len(base), self.max_entries):
            reads = [self.read_key(k, now) for k in shard_keys]
            self._charge(cost, len(reads), 1, reads)
            known.add(prefix)
        return _listed(key_shards.combine(base, reads, self.max_entries, fresher), prefix)

    @staticmethod
    def _charge(cost: ReadCost | None, keys: int, rounds: int,
                reads: Sequence[dict[str, tuple[ServerEntry, bytes]]]) -> None:
        if cost is not None:
            cost.keys += keys
            cost.rounds += rounds
            cost.entry_bytes += sum(len(b) for found in reads for _e, b in found.values())

    def holders(self, uids: Sequence[str], now: float,
                cost: ReadCost | None = None) -> dict[str, list[ServerEntry]]:
        """uid -> live entries listing it (``ExpertRegistry.holders``: one lookup per parent)."""
        parents: dict[str, list[tuple[str, str]]] = {}
        for uid in dict.fromkeys(uids):
            prefix, child = records.parent_pair(uid)
            parents.setdefault(prefix, []).append((uid, child))
        out: dict[str, list[ServerEntry]] = {}
        for prefix, pairs in parents.items():
            entries = self.lookup(prefix, now, cost)
            for uid, child in pairs:
                out[uid] = [e for e in entries if child in e.children]
        return out


def _fresher(a: tuple[ServerEntry, bytes], b: tuple[ServerEntry, bytes]) -> bool:
    return a[0].freshness() > b[0].freshness()


def _listed(found: dict[str, tuple[ServerEntry, bytes]], prefix: str) -> list[ServerEntry]:
    return [e for e, _b in found.values() if not e.withdrawn and e.prefix == prefix]

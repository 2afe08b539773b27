"""Sharded prefix keys: how a hot registry key holds more servers than one key may.

Why: a DHT key keeps at most ``RecordPolicy.max_entries`` entries (256 by default; see
``records.merge_entries``: held entries win, newcomers are refused "key_full"). When
thousands of volunteers serve one grid, every one of them writes the grid root's key and
the key of each row it hosts an expert in; with 10,000 volunteers hosting 4 experts of a
32x32 grid a row key is written by ~1,200 servers, so ~80% of them are listed nowhere and no
trainer ever sends them work (measured by ``volunteer.sim.grid_scale``).

The layout (all pure functions; the DHT plumbing stays in ``registry.py``):

- A server writes each entry under the prefix's *base* key (``records.dht_key``, as before,
  so readers of the old layout still find it) **and** under one of ``KEY_SHARDS`` *shard
  keys* of that prefix, chosen by a hash of its own peer id (``shard_of``). Both keys are
  derived from the entry's signed fields (experiment, prefix, peer id), so a DHT server
  checks either placement from the entry alone (``allowed_keys``; ``records.verify_entry``
  calls it) and one signer cannot spread over other shards.
- A reader reads the base key. Only when it comes back nearly full (``is_full``: at least
  ``FULL_FRACTION`` of the per-key cap) does it read every shard key of the prefix too and
  use the union (``combine``); it remembers the prefix as full and next time reads its
  shard keys alone (``union``), going back to the base key when they hold less than a full
  key. So a small swarm costs one lookup per prefix, exactly as before; a big one costs
  ``KEY_SHARDS`` lookups per prefix (a bound), and every server is listed: a prefix holds
  up to ``KEY_SHARDS x max_entries`` distinct servers. Every reader reads every shard, so
  no server is seen by more trainers than another. The price: a reader of a big prefix
  receives every server's entry (bytes grow with the servers of the prefix, as they did up
  to the cap before); ``volunteer.sim.grid_scale`` measures it.
- Backward compatibility: old readers read the base key only (they see what they saw
  before); old writers write the base key only, and a new reader keeps the base key's
  entries in the union on the read that finds the key full (afterwards it reads the shards
  alone, so in a big swarm that mixes versions old writers are listed by fewer reads). DHT
  servers running the old code refuse entries filed under shard keys ("wrong_key"); a swarm
  that mixes versions keeps working as the old layout did, and lists everyone once its DHT
  servers are new.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TypeVar

KEY_SHARDS = 8
"""Shard keys per prefix. All nodes of a swarm must agree on it (it is part of the layout)."""

FULL_FRACTION = 0.75
"""A base key holding at least this fraction of the per-key cap is read as full."""

NAMESPACE = "volunteer"  # the DHT namespace of registry keys (as ``records.NAMESPACE``)

V = TypeVar("V")


def shard_of(peer_id: str, shards: int = KEY_SHARDS) -> int:
    """The shard (0 .. shards-1) a peer files its entries under: a hash of its peer id."""
    if shards < 1:
        raise ValueError("shards must be at least 1")
    digest = hashlib.sha256(peer_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % shards


def shard_key(experiment: str, prefix: str, index: int) -> str:
    """The DHT key of shard ``index`` of a prefix query (43 bytes, as the base key)."""
    digest = hashlib.sha256(f"{experiment}\x00{prefix}\x00shard{int(index)}".encode()).hexdigest()
    return f"/{NAMESPACE}/{digest[:32]}"


def shard_keys(experiment: str, prefix: str, shards: int = KEY_SHARDS) -> list[str]:
    """Every shard key of a prefix query, in shard order."""
    return [shard_key(experiment, prefix, i) for i in range(shards)]


def writer_shard_key(experiment: str, prefix: str, peer_id: str, shards: int = KEY_SHARDS) -> str:
    """The one shard key ``peer_id`` writes its entry for ``prefix`` under."""
    return shard_key(experiment, prefix, shard_of(peer_id, shards))


def allowed_keys(base_key: str, experiment: str, prefix: str, peer_id: str) -> tuple[str, str]:
    """The two keys an entry of ``peer_id`` for ``prefix`` may be filed under."""
    return base_key, writer_shard_key(experiment, prefix, peer_id)


def is_full(entries: int, max_entries: int) -> bool:
    """True when a base key holding ``entries`` live entries should send readers to the shards."""
    return max_entries > 0 and entries >= max(1, int(max_entries * FULL_FRACTION))


def union(reads: Sequence[Mapping[str, V]], fresher: object = None) -> dict[str, V]:
    """One value per peer id over several key reads (``fresher`` as in ``combine``)."""
    out: dict[str, V] = {}
    for found in reads:
        for pid, value in found.items():
            old = out.get(pid)
            if old is None or (callable(fresher) and fresher(value, old)):
                out[pid] = value
    return out


def combine(base: Mapping[str, V], shard_reads: Sequence[Mapping[str, V]] | None,
            max_entries: int, fresher: object = None) -> dict[str, V]:
    """What a reader uses: the base key's entries, or, when that key is full and shards were
    read, the union of the base and every shard (one entry per peer id).

    ``base`` / each shard read map peer id -> value (e.g. ``(ServerEntry, blob)``). ``fresher``:
    optional ``f(a, b) -> bool``, True when ``a`` should replace ``b`` for one peer (default:
    the first seen, base first, wins).
    """
    if not shard_reads or not is_full(len(base), max_entries):
        return dict(base)
    return union([base, *shard_reads], fresher)


WRITE_STATE_TTL_S = 300.0
"""How long what this node last read of a prefix's base key steers its writes (``write_keys``)."""


def write_keys(base_key: str, shard: str, seen: tuple[bool, bool, float] | None, now: float) -> tuple[str, ...]:
    """The keys a writer files its entry under, from what its own last read of the base key
    showed (``seen`` = (full, listed there, when), or None: never read, or longer ago than
    ``WRITE_STATE_TTL_S``):

    - not full: the base key alone (a small swarm writes exactly what it did before sharding);
    - full and this node listed there: both (it stays listed for readers of the base key, and
      its shard lists it for readers that read a full prefix's shards alone);
    - full and this node not listed: its shard key alone (the base key would refuse it);
    - unknown: both (safe either way).

    So a hot prefix's base key takes the writes of the ~``max_entries`` nodes it lists, not of
    every server of the prefix (``scripts/simulate_swarm.py`` counts the PUTs)."""
    if seen is None or now - seen[2] > WRITE_STATE_TTL_S:
        return (base_key, shard)
    full, listed, _when = seen
    if not full:
        return (base_key,)
    return (base_key, shard) if listed else (shard,)

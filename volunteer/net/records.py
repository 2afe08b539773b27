"""Signed expert-registry records and the multi-entry DHT values that hold them.

Schema (pure functions, no I/O; the DHT plumbing is in ``dht_store.py``, the bounds and
validators of every field in ``record_fields.py``):

- A server announces, for every *prefix query* that indexes one of its experts, one
  ``ServerEntry``: who it is (peer id), which next coordinates it hosts under that prefix
  (``children``), its state (serving / draining / paused: a paused server keeps its
  experts loaded and hands out its shards but takes no new work, so trainers skip it), load, addresses (libp2p multiaddrs, relay
  addresses included), its direct ZeroMQ endpoint and reachability, a sequence number and an
  absolute expiry. Under the prefix that lists a uid itself, the entry also says which expert
  *shard* the server can hand out for that child (``shards``: child, version = updates
  applied, root hash of the shard; see ``volunteer.experts.shard``), and every entry carries
  how many more experts the server would take (``free``), which a leaving node reads to pick
  who adopts its experts. An entry may carry an admission ``token`` (opaque bytes, checked by
  the experiment's ``admit`` filter when it has one). Uid ``demo.ffn.3.7`` (grid prefix
  ``demo.ffn.``) is indexed under ``demo.ffn.`` with child ``3`` and under ``demo.ffn.3.``
  with child ``7``; a beam search needs one lookup per beam entry per dimension, and
  ``resolve("demo.ffn.3.7")`` reads the same value as ``children(["demo.ffn.3."])``.
- An entry is msgpack ``[payload, signature]``; the payload names the experiment and the
  prefix, and the signature is the peer's Ed25519 signature over ``DOMAIN + payload``. The
  public key comes from the peer id itself (Ed25519 peer ids inline the key), so a reader
  needs nothing but the entry to verify it.
- A DHT key is ``/volunteer/<sha256(experiment NUL prefix)[:32]>``: namespaced per
  experiment, and bounded in length whatever the uids look like. A DHT value is msgpack
  ``{"v": 1, "e": [entry, ...]}`` with at most one entry per peer (the highest seq);
  DHT servers merge values instead of replacing them (see ``merge_values``), so several
  servers can announce under one key without overwriting each other. Each entry is also
  filed under one shard key of its prefix, so a prefix lists more servers than one key holds
  (``key_shards.py``).
- A *withdrawal* (tombstone) is an entry with no children. It expires no earlier than the
  last entry its peer announced under that key, and carries a higher seq, so replaying the
  older entry loses to it for as long as that entry could be alive. Readers ignore
  tombstones as servers.

Readers reject forged entries (bad signature, wrong key for the peer id), tampered ones
(any byte changed breaks the signature), entries filed under another key or experiment,
out-of-bounds fields, expired ones, and ones whose expiry is further away than the
experiment's TTL (``max_ttl``, default ``MAX_TTL``; so a vanished node's record cannot
linger). Lenient readers (``valid_entries``, ``merge_values``) drop such entries and count
the reason in a ``RecordStats``; the strict ``check_value`` raises.

Merging is *fair*: one entry per peer, at most ``max_entries`` per key, and when the key is
full the entries already held and still alive win over newcomers (a newcomer takes only the
slot of an expired entry), so a burst of fresh keys cannot push honest entries out.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import msgpack
from libp2p.crypto.keys import PrivateKey
from libp2p.peer.id import ID

from volunteer.net import key_shards
from volunteer.net import record_fields as f
from volunteer.net.record_fields import (  # noqa: F401  (re-exported: the public names of records)
    MAX_ADDRS,
    MAX_CHILDREN,
    MAX_ENTRIES_PER_VALUE,
    MAX_ENTRY_BYTES,
    MAX_FREE_SLOTS,
    MAX_LOAD,
    MAX_SHARD_VERSION,
    MAX_STR,
    MAX_TOKEN_BYTES,
    MAX_TTL,
    REACHABILITY,
    ROOT_BYTES,
    STATES,
    ExpiredRecordError,
    ForgedRecordError,
    MalformedRecordError,
    NotAdmittedError,
    RecordError,
    RecordStats,
    ServerEntry,
    ShardInfo,
    StoreRefusedError,
    WrongKeyError,
)

NAMESPACE = "volunteer"
DOMAIN = b"volunteer/registry-entry/v1\x00"
VALUE_VERSION = 1
MAX_ENTRIES_PER_KEY = MAX_ENTRIES_PER_VALUE
MAX_VALUE_BYTES = MAX_ENTRIES_PER_VALUE * (MAX_ENTRY_BYTES + 16) + 64

STATS = RecordStats()  # where drops are counted when the caller passes no stats of its own
_UNCOUNTED = RecordStats()  # sink for re-reads of what this node already holds

# Entries whose signature already verified, by sha256 of the whole blob (DHT servers see
# the same entries again on every merge; readers on every lookup), and entries rejected
# for a reason that does not depend on time or key (malformed, forged). Bounded LRUs.
VERIFIED_CACHE_SIZE = 16384
_verified: OrderedDict[bytes, ServerEntry] = OrderedDict()
_rejected: OrderedDict[bytes, RecordError] = OrderedDict()
_verified_lock = threading.Lock()


Admit = Callable[[ServerEntry], bool]


@dataclass(frozen=True)
class RecordPolicy:
    """What a node accepts from records: the experiment's TTL bound, entries per key, the
    admission filter (None = open experiment) and where drops are counted."""

    max_ttl: float = MAX_TTL
    max_entries: int = MAX_ENTRIES_PER_KEY
    admit: Admit | None = None
    stats: RecordStats = STATS


def dht_key(experiment: str, prefix: str) -> str:
    """The DHT key for a prefix query of an experiment (namespace ``/volunteer/``).

    43 bytes: py-libp2p DHT servers refuse FIND_NODE keys longer than 50 bytes.
    """
    digest = hashlib.sha256(f"{experiment}\x00{prefix}".encode()).hexdigest()[:32]
    return f"/{NAMESPACE}/{digest}"


def index_pairs(uid: str) -> list[tuple[str, str]]:
    """(prefix query, child) pairs that index ``uid``.

    Grid coordinates are the trailing integer components: ``demo.ffn.3.7`` ->
    ``[("demo.ffn.", "3"), ("demo.ffn.3.", "7")]``. A uid without integer components is
    indexed under its parent only: ``a.b`` -> ``[("a.", "b")]``, ``solo`` -> ``[("", "solo")]``.
    """
    parts = uid.split(".")
    if not uid or any(p == "" for p in parts):
        raise ValueError(f"bad expert uid {uid!r}: empty component")
    first = len(parts) - 1
    while first > 0 and parts[first - 1].isdigit() and parts[first].isdigit():
        first -= 1
    if first > 0 and not parts[first].isdigit():
        first = len(parts) - 1
    pairs = []
    for i in range(first, len(parts)):
        prefix = ".".join(parts[:i]) + "." if i > 0 else ""
        pairs.append((prefix, parts[i]))
    return pairs


def parent_pair(uid: str) -> tuple[str, str]:
    """The (prefix query, child) pair under which ``uid`` itself is listed."""
    return index_pairs(uid)[-1]


def sign_entry(entry: ServerEntry, private_key: PrivateKey) -> bytes:
    """Encode and sign ``entry`` (the key must be the one behind ``entry.peer_id``).

    Raises ``MalformedRecordError`` (a ValueError) when a field is out of the bounds
    readers enforce, or the entry exceeds ``MAX_ENTRY_BYTES``.
    """
    fields = {
        "x": entry.experiment, "p": entry.prefix, "id": entry.peer_id, "seq": entry.seq,
        "exp": entry.expires, "c": list(entry.children), "s": entry.state, "l": entry.load,
        "a": list(entry.addrs), "z": entry.zmq, "r": entry.reachability,
        "h": [[i.child, i.version, i.root] for i in entry.shards], "f": entry.free,
    }
    if entry.token is not None:
        fields["adm"] = entry.token
    payload = msgpack.packb(fields, use_bin_type=True)
    f.decode_payload(payload)  # what readers would refuse is never signed
    blob = msgpack.packb([payload, private_key.sign(DOMAIN + payload)], use_bin_type=True)
    if len(blob) > MAX_ENTRY_BYTES:
        raise f.malformed("bad_entry", f"registry entry is {len(blob)} bytes (max {MAX_ENTRY_BYTES})")
    return blob


def _verified_entry(blob: bytes) -> ServerEntry:
    """Decode and check the signature of ``blob`` (cached both ways by its digest)."""
    digest = hashlib.sha256(blob).digest()
    with _verified_lock:
        entry = _verified.get(digest)
        rejected = _rejected.get(digest) if entry is None else None
    if entry is not None:
        return entry
    if rejected is not None:
        raise type(rejected)(str(rejected), reason=rejected.reason)
    try:
        entry = _decode_signed(blob)
    except RecordError as e:
        with _verified_lock:
            _rejected[digest] = e
            if len(_rejected) > VERIFIED_CACHE_SIZE:
                _rejected.popitem(last=False)
        raise
    with _verified_lock:
        _verified[digest] = entry
        if len(_verified) > VERIFIED_CACHE_SIZE:
            _verified.popitem(last=False)
    return entry


def _decode_signed(blob: bytes) -> ServerEntry:
    try:
        outer = msgpack.unpackb(blob, raw=False)
    except Exception as e:
        raise f.malformed("bad_entry", f"entry is not msgpack: {type(e).__name__}") from None
    if (not isinstance(outer, list) or len(outer) != 2
            or not all(isinstance(x, bytes) for x in outer)):
        raise f.malformed("bad_entry", "entry must be [payload bytes, signature bytes]")
    payload, signature = outer
    entry = f.decode_payload(payload)
    try:
        pid = ID.from_base58(entry.peer_id)
        pubkey = pid.extract_public_key()
    except Exception:
        raise ForgedRecordError(f"peer id {entry.peer_id!r} does not carry a key") from None
    if pubkey is None or ID.from_pubkey(pubkey) != pid:
        raise ForgedRecordError(f"peer id {entry.peer_id!r} does not carry its key")
    try:
        ok = pubkey.verify(DOMAIN + payload, signature)
    except Exception:
        ok = False
    if not ok:
        raise ForgedRecordError(f"bad signature on entry from {entry.peer_id}")
    return entry


def verify_entry(blob: bytes, *, key: str | None = None, now: float | None = None,
                 allow_expired: bool = False, max_ttl: float = MAX_TTL) -> ServerEntry:
    """Decode and verify one entry; raise a RecordError subclass when it must be rejected.

    ``key``: the DHT key the entry was found under: the prefix's base key or the writer's
    own shard key of it (``key_shards``), checked against experiment + prefix + peer id.
    ``max_ttl``: the experiment's TTL; an entry expiring later than that (plus the tolerated
    clock skew) from now is refused.
    """
    if not isinstance(blob, bytes) or len(blob) > MAX_ENTRY_BYTES:
        raise f.malformed("bad_entry", "entry must be bytes of bounded size")
    entry = _verified_entry(blob)
    if key is not None and key not in key_shards.allowed_keys(
            dht_key(entry.experiment, entry.prefix), entry.experiment, entry.prefix, entry.peer_id):
        raise WrongKeyError(f"entry for {entry.experiment!r}/{entry.prefix!r} under wrong key")
    now = time.time() if now is None else now
    if entry.expires > now + max_ttl + f.CLOCK_SKEW:
        raise ExpiredRecordError(f"entry from {entry.peer_id} expires too far ahead",
                                 reason="too_far_ahead")
    if not allow_expired and entry.expires < now:
        raise ExpiredRecordError(f"entry from {entry.peer_id} expired")
    return entry


def encode_value(blobs: Iterable[bytes]) -> bytes:
    blobs = list(blobs)[:MAX_ENTRIES_PER_VALUE]
    return msgpack.packb({"v": VALUE_VERSION, "e": blobs}, use_bin_type=True)


def decode_value(value: bytes) -> list[bytes]:
    """Split a DHT value into entry blobs (unverified); MalformedRecordError if bad."""
    if not isinstance(value, bytes) or len(value) > MAX_VALUE_BYTES:
        raise f.malformed("bad_value", "value must be bytes of bounded size")
    try:
        obj = msgpack.unpackb(value, raw=False, max_array_len=MAX_ENTRIES_PER_VALUE * 4,
                              max_map_len=16)
    except Exception as e:
        raise f.malformed("bad_value", f"value is not msgpack: {type(e).__name__}") from None
    if not isinstance(obj, dict) or obj.get("v") != VALUE_VERSION:
        raise f.malformed("bad_value", f"value must be a map with v={VALUE_VERSION}")
    entries = obj.get("e")
    if not isinstance(entries, list) or not all(isinstance(b, bytes) for b in entries):
        raise f.malformed("bad_value", "value field 'e' must be a list of bytes")
    if len(entries) > MAX_ENTRIES_PER_VALUE:
        raise f.malformed("too_many_entries", f"a value holds <= {MAX_ENTRIES_PER_VALUE} entries")
    return entries


def _admitted(entry: ServerEntry, admit: Admit | None) -> bool:
    if admit is None:
        return True
    try:
        return bool(admit(entry))
    except Exception:  # the filter reads peer bytes (the token): any failure refuses
        return False


def valid_entries(values: Sequence[bytes | None], *, key: str, now: float | None = None,
                  allow_expired: bool = False, max_ttl: float = MAX_TTL,
                  admit: Admit | None = None, stats: RecordStats | None = None,
                  ) -> dict[str, tuple[ServerEntry, bytes]]:
    """Union of the valid entries in ``values``: peer id -> (freshest entry, its blob).

    Undecodable values and invalid or refused (``admit``) entries are dropped and counted
    in ``stats`` (default ``STATS``); one bad entry never hides good ones, never raises.
    Tombstones are kept (a merge needs them); readers skip them as servers.
    """
    stats = STATS if stats is None else stats
    now = time.time() if now is None else now
    best: dict[str, tuple[ServerEntry, bytes]] = {}
    for value in values:
        if value is None:
            continue
        try:
            blobs = decode_value(value)
        except RecordError as e:
            stats.count(e.reason)
            continue
        for blob in blobs:
            try:
                e = verify_entry(blob, key=key, now=now, allow_expired=allow_expired,
                                 max_ttl=max_ttl)
            except RecordError as err:
                stats.count(err.reason)
                continue
            if not _admitted(e, admit):
                stats.count("not_admitted")
                continue
            old = best.get(e.peer_id)
            if old is None or e.freshness() > old[0].freshness():
                best[e.peer_id] = (e, blob)
    return best


def merge_entries(held: dict[str, tuple[ServerEntry, bytes]],
                  incoming: dict[str, tuple[ServerEntry, bytes]], *, now: float,
                  max_entries: int = MAX_ENTRIES_PER_KEY, stats: RecordStats | None = None,
                  may_add: Admit | None = None, rng: random.Random | None = None,
                  ) -> dict[str, tuple[ServerEntry, bytes]]:
    """The fair merge: one entry per peer (the highest freshness), held entries first.

    Held entries that expired free their slot. A peer already held is replaced only by a
    fresher entry of its own (an older one is a replay, counted "stale"). A new peer takes a
    slot only while fewer than ``max_entries`` are held ("key_full" otherwise) and
    ``may_add`` agrees (it counts its own refusals); newcomers of one burst are tried in
    random order, so no signer can sort itself first.
    """
    stats = STATS if stats is None else stats
    out = {pid: eb for pid, eb in held.items() if eb[0].alive(now)}
    newcomers: list[str] = []
    for pid, (e, blob) in incoming.items():
        if not e.alive(now):
            continue
        old = out.get(pid)
        if old is None:
            newcomers.append(pid)
        elif e.freshness() > old[0].freshness():
            out[pid] = (e, blob)
        elif e.freshness() < old[0].freshness():
            stats.count("stale")
    (rng or random).shuffle(newcomers)
    for pid in newcomers:
        if len(out) >= max_entries:
            stats.count("key_full")
        elif may_add is None or may_add(incoming[pid][0]):
            out[pid] = incoming[pid]
    return out


def merge_values(values: Sequence[bytes | None], *, key: str, now: float | None = None,
                 max_ttl: float = MAX_TTL, admit: Admit | None = None,
                 stats: RecordStats | None = None, max_entries: int = MAX_ENTRIES_PER_KEY,
                 may_add: Admit | None = None) -> bytes | None:
    """Merge DHT values: ``values[0]`` is what this node holds, the others are newcomers
    (see ``merge_entries``). Returns the merged value, or None if nothing live remains."""
    now = time.time() if now is None else now
    held = valid_entries(values[:1], key=key, now=now, max_ttl=max_ttl, admit=admit,
                         stats=_UNCOUNTED)
    incoming = valid_entries(values[1:], key=key, now=now, max_ttl=max_ttl, admit=admit,
                             stats=stats)
    merged = merge_entries(held, incoming, now=now, max_entries=max_entries, stats=stats,
                           may_add=may_add)
    if not merged:
        return None
    return encode_value(blob for _pid, (_e, blob) in sorted(merged.items()))


def has_news(old: bytes | None, new: bytes, *, key: str, now: float | None = None,
             max_ttl: float = MAX_TTL, admit: Admit | None = None) -> bool:
    """True when ``new`` holds a live entry fresher than ``old``'s entry from that peer."""
    now = time.time() if now is None else now
    old_best = valid_entries([old], key=key, now=now, max_ttl=max_ttl, admit=admit,
                             stats=_UNCOUNTED)
    for pid, (e, _b) in valid_entries([new], key=key, now=now, max_ttl=max_ttl, admit=admit,
                                      stats=_UNCOUNTED).items():
        prev = old_best.get(pid)
        if prev is None or e.freshness() > prev[0].freshness():
            return True
    return False


def check_value(key: str, value: bytes, now: float | None = None, *, max_ttl: float = MAX_TTL,
                admit: Admit | None = None, stats: RecordStats | None = None) -> None:
    """Strict check for an incoming PUT: every entry valid, admitted and for this key; one
    live. Raises RecordError (its reason counted in ``stats``). Readers use the lenient
    ``valid_entries`` instead."""
    stats = STATS if stats is None else stats
    try:
        blobs = decode_value(value)
        if not blobs:
            raise f.malformed("bad_value", "value holds no entries")
        now = time.time() if now is None else now
        live = 0
        for blob in blobs:
            e = verify_entry(blob, key=key, now=now, allow_expired=True, max_ttl=max_ttl)
            if not _admitted(e, admit):
                raise NotAdmittedError(f"entry from {e.peer_id} not admitted")
            live += e.alive(now)
        if not live:
            raise ExpiredRecordError("value holds no live entry")
    except RecordError as e:
        stats.count(e.reason)
        raise

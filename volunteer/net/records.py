"""Signed expert-registry records and the multi-entry DHT values that hold them.

Schema (pure functions, no I/O; the DHT plumbing is in ``dht_store.py``):

- A server announces, for every *prefix query* that indexes one of its experts, one
  ``ServerEntry``: who it is (peer id), which next coordinates it hosts under that prefix
  (``children``), its state (serving / draining), load, addresses (libp2p multiaddrs, relay
  addresses included), its direct ZeroMQ endpoint and reachability, a sequence number and an
  absolute expiry. Under the prefix that lists a uid itself, the entry also says which expert
  *shard* the server can hand out for that child (``shards``: child, version = updates
  applied, root hash of the shard; see ``volunteer.experts.shard``), and every entry carries
  how many more experts the server would take (``free``), which a leaving node reads to pick
  who adopts its experts. Uid ``demo.ffn.3.7`` (grid prefix ``demo.ffn.``) is indexed under
  ``demo.ffn.`` with child ``3`` and under ``demo.ffn.3.`` with child ``7``; a beam search
  needs one lookup per beam entry per dimension, and ``resolve("demo.ffn.3.7")`` reads the
  same value as ``children(["demo.ffn.3."])`` (a cache hit right after beam search).
- An entry is msgpack ``[payload, signature]``; the payload names the experiment and the
  prefix, and the signature is the peer's Ed25519 signature over ``DOMAIN + payload``. The
  public key comes from the peer id itself (Ed25519 peer ids inline the key), so a reader
  needs nothing but the entry to verify it.
- A DHT key is ``/volunteer/<sha256(experiment NUL prefix)[:32]>``: namespaced per
  experiment, and bounded in length whatever the uids look like. A DHT value is msgpack
  ``{"v": 1, "e": [entry, ...]}`` with at most one entry per peer (the highest seq);
  DHT servers merge values instead of replacing them (see ``merge_values``), so several
  servers can announce under one key without overwriting each other.

Readers reject forged entries (bad signature, wrong key for the peer id), tampered ones
(any byte changed breaks the signature), entries filed under another key or experiment,
expired ones, and ones whose expiry is further away than ``MAX_TTL`` (so a vanished node's
record cannot linger).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgpack
from libp2p.crypto.keys import PrivateKey
from libp2p.peer.id import ID

NAMESPACE = "volunteer"
DOMAIN = b"volunteer/registry-entry/v1\x00"
VALUE_VERSION = 1
MAX_TTL = 3600.0
MAX_ENTRY_BYTES = 8192
MAX_ENTRIES_PER_VALUE = 256
MAX_VALUE_BYTES = MAX_ENTRIES_PER_VALUE * (MAX_ENTRY_BYTES + 16) + 64
MAX_CHILDREN = 512
MAX_ADDRS = 16
MAX_STR = 512
MAX_FREE_SLOTS = 4096
MAX_SHARD_VERSION = 2**53
ROOT_BYTES = 32
STATES = ("serving", "draining")
REACHABILITY = ("public", "private", "unknown")


# Entries whose signature already verified, by sha256 of the whole blob (DHT servers see
# the same entries again on every merge; readers on every lookup). Bounded LRU.
VERIFIED_CACHE_SIZE = 16384
_verified: OrderedDict[bytes, ServerEntry] = OrderedDict()
_verified_lock = threading.Lock()


class RecordError(ValueError):
    """An entry or value that a reader must reject."""


class MalformedRecordError(RecordError):
    """Not decodable, wrong types, or out of bounds."""


class ForgedRecordError(RecordError):
    """Signature does not verify with the announcing peer's key."""


class ExpiredRecordError(RecordError):
    """Past its expiry, or expiring implausibly far in the future."""


class WrongKeyError(RecordError):
    """Filed under a key of another prefix or experiment."""


@dataclass(frozen=True)
class ShardInfo:
    """A shard a server can hand out: the expert ``child`` at ``version``, by root hash."""

    child: str
    version: int
    root: bytes


@dataclass(frozen=True)
class ServerEntry:
    """One server's announcement under one prefix query."""

    experiment: str
    prefix: str
    peer_id: str
    seq: int
    expires: float
    children: tuple[str, ...]
    state: str
    load: float
    addrs: tuple[str, ...] = ()
    zmq: str | None = None
    reachability: str = "unknown"
    shards: tuple[ShardInfo, ...] = ()
    free: int = 0

    def shard(self, child: str) -> ShardInfo | None:
        """The shard this server announces for ``child`` (None when it announces none)."""
        for info in self.shards:
            if info.child == child:
                return info
        return None

    def alive(self, now: float | None = None) -> bool:
        return self.expires >= (time.time() if now is None else now)

    def freshness(self) -> tuple[int, float]:
        return (self.seq, self.expires)


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
    """Encode and sign ``entry`` (the key must be the one behind ``entry.peer_id``)."""
    payload = msgpack.packb(
        {
            "x": entry.experiment,
            "p": entry.prefix,
            "id": entry.peer_id,
            "seq": entry.seq,
            "exp": entry.expires,
            "c": list(entry.children),
            "s": entry.state,
            "l": entry.load,
            "a": list(entry.addrs),
            "z": entry.zmq,
            "r": entry.reachability,
            "h": [[i.child, i.version, i.root] for i in entry.shards],
            "f": entry.free,
        },
        use_bin_type=True,
    )
    blob = msgpack.packb([payload, private_key.sign(DOMAIN + payload)], use_bin_type=True)
    if len(blob) > MAX_ENTRY_BYTES:
        raise ValueError(f"registry entry is {len(blob)} bytes (max {MAX_ENTRY_BYTES})")
    return blob


def _s(obj: dict, key: str, *, optional: bool = False) -> str | None:
    v = obj.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or len(v) > MAX_STR:
        raise MalformedRecordError(f"field {key!r} must be a string of <= {MAX_STR} chars")
    return v


def _str_list(obj: dict, key: str, limit: int) -> tuple[str, ...]:
    v = obj.get(key)
    if not isinstance(v, list) or len(v) > limit:
        raise MalformedRecordError(f"field {key!r} must be a list of <= {limit} items")
    if not all(isinstance(x, str) and 0 < len(x) <= MAX_STR for x in v):
        raise MalformedRecordError(f"field {key!r} must hold non-empty strings")
    return tuple(v)


def _shard_list(obj: dict, children: tuple[str, ...]) -> tuple[ShardInfo, ...]:
    """Field ``h``: [[child, version, root], ...], each child listed in ``c`` at most once."""
    v = obj.get("h", [])
    if not isinstance(v, list) or len(v) > MAX_CHILDREN:
        raise MalformedRecordError(f"field 'h' must be a list of <= {MAX_CHILDREN} items")
    out: list[ShardInfo] = []
    seen: set[str] = set()
    listed = set(children)
    for item in v:
        if not isinstance(item, list) or len(item) != 3:
            raise MalformedRecordError("field 'h' must hold [child, version, root] triples")
        child, version, root = item
        if not isinstance(child, str) or child not in listed or child in seen:
            raise MalformedRecordError("field 'h' names a child not listed in 'c' (or twice)")
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= MAX_SHARD_VERSION:
            raise MalformedRecordError(f"shard version must be an int in [0, {MAX_SHARD_VERSION}]")
        if not isinstance(root, bytes) or len(root) != ROOT_BYTES:
            raise MalformedRecordError(f"shard root must be {ROOT_BYTES} bytes")
        seen.add(child)
        out.append(ShardInfo(child, version, root))
    return tuple(out)


def _decode_payload(payload: bytes) -> ServerEntry:
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as e:
        raise MalformedRecordError(f"entry payload is not msgpack: {e}") from None
    if not isinstance(obj, dict):
        raise MalformedRecordError("entry payload must be a map")
    seq, expires, load = obj.get("seq"), obj.get("exp"), obj.get("l")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**63:
        raise MalformedRecordError("field 'seq' must be a non-negative int")
    for name, v in (("exp", expires), ("l", load)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise MalformedRecordError(f"field {name!r} must be a finite number")
    state = _s(obj, "s")
    if state not in STATES:
        raise MalformedRecordError(f"field 's' must be one of {STATES}")
    reach = _s(obj, "r")
    if reach not in REACHABILITY:
        raise MalformedRecordError(f"field 'r' must be one of {REACHABILITY}")
    free = obj.get("f", 0)
    if not isinstance(free, int) or isinstance(free, bool) or not 0 <= free <= MAX_FREE_SLOTS:
        raise MalformedRecordError(f"field 'f' must be an int in [0, {MAX_FREE_SLOTS}]")
    children = _str_list(obj, "c", MAX_CHILDREN)
    return ServerEntry(
        experiment=_s(obj, "x"),  # type: ignore[arg-type]
        prefix=_s(obj, "p"),  # type: ignore[arg-type]
        peer_id=_s(obj, "id"),  # type: ignore[arg-type]
        seq=seq,
        expires=float(expires),
        children=children,
        state=state,  # type: ignore[arg-type]
        load=float(load),
        addrs=_str_list(obj, "a", MAX_ADDRS),
        zmq=_s(obj, "z", optional=True),
        reachability=reach,  # type: ignore[arg-type]
        shards=_shard_list(obj, children),
        free=free,
    )


def verify_entry(blob: bytes, *, key: str | None = None, now: float | None = None,
                 allow_expired: bool = False) -> ServerEntry:
    """Decode and verify one entry; raise a RecordError subclass when it must be rejected.

    ``key``: the DHT key the entry was found under (checked against experiment + prefix).
    """
    if not isinstance(blob, bytes) or len(blob) > MAX_ENTRY_BYTES:
        raise MalformedRecordError("entry must be bytes of bounded size")
    try:
        outer = msgpack.unpackb(blob, raw=False)
    except Exception as e:
        raise MalformedRecordError(f"entry is not msgpack: {e}") from None
    if (not isinstance(outer, list) or len(outer) != 2
            or not all(isinstance(x, bytes) for x in outer)):
        raise MalformedRecordError("entry must be [payload bytes, signature bytes]")
    payload, signature = outer
    digest = hashlib.sha256(blob).digest()
    with _verified_lock:
        entry = _verified.get(digest)
    if entry is None:
        entry = _decode_payload(payload)
        try:
            pid = ID.from_base58(entry.peer_id)
            pubkey = pid.extract_public_key()
        except Exception:
            raise ForgedRecordError(f"peer id {entry.peer_id!r} does not carry a key") from None
        if pubkey is None or ID.from_pubkey(pubkey) != pid:
            raise ForgedRecordError(f"peer id {entry.peer_id!r} does not carry its key")
        if not pubkey.verify(DOMAIN + payload, signature):
            raise ForgedRecordError(f"bad signature on entry from {entry.peer_id}")
        with _verified_lock:
            _verified[digest] = entry
            if len(_verified) > VERIFIED_CACHE_SIZE:
                _verified.popitem(last=False)
    if key is not None and dht_key(entry.experiment, entry.prefix) != key:
        raise WrongKeyError(f"entry for {entry.experiment!r}/{entry.prefix!r} under wrong key")
    now = time.time() if now is None else now
    if entry.expires > now + MAX_TTL + 60.0:
        raise ExpiredRecordError(f"entry from {entry.peer_id} expires too far ahead")
    if not allow_expired and entry.expires < now:
        raise ExpiredRecordError(f"entry from {entry.peer_id} expired")
    return entry


def encode_value(blobs: Iterable[bytes]) -> bytes:
    blobs = list(blobs)[:MAX_ENTRIES_PER_VALUE]
    return msgpack.packb({"v": VALUE_VERSION, "e": blobs}, use_bin_type=True)


def decode_value(value: bytes) -> list[bytes]:
    """Split a DHT value into entry blobs (unverified); MalformedRecordError if bad."""
    if not isinstance(value, bytes) or len(value) > MAX_VALUE_BYTES:
        raise MalformedRecordError("value must be bytes of bounded size")
    try:
        obj = msgpack.unpackb(value, raw=False)
    except Exception as e:
        raise MalformedRecordError(f"value is not msgpack: {e}") from None
    if not isinstance(obj, dict) or obj.get("v") != VALUE_VERSION:
        raise MalformedRecordError(f"value must be a map with v={VALUE_VERSION}")
    entries = obj.get("e")
    if (not isinstance(entries, list) or len(entries) > MAX_ENTRIES_PER_VALUE
            or not all(isinstance(b, bytes) for b in entries)):
        raise MalformedRecordError("value field 'e' must be a bounded list of bytes")
    return entries


def valid_entries(values: Sequence[bytes], *, key: str, now: float | None = None,
                  allow_expired: bool = False) -> dict[str, tuple[ServerEntry, bytes]]:
    """Union of the valid entries in ``values``: peer id -> (freshest entry, its blob).

    Undecodable values and invalid entries are skipped (one bad entry never hides good ones).
    """
    now = time.time() if now is None else now
    best: dict[str, tuple[ServerEntry, bytes]] = {}
    for value in values:
        try:
            blobs = decode_value(value)
        except RecordError:
            continue
        for blob in blobs:
            try:
                e = verify_entry(blob, key=key, now=now, allow_expired=allow_expired)
            except RecordError:
                continue
            old = best.get(e.peer_id)
            if old is None or e.freshness() > old[0].freshness():
                best[e.peer_id] = (e, blob)
    return best


def merge_values(values: Sequence[bytes], *, key: str, now: float | None = None) -> bytes | None:
    """Merge DHT values: freshest live entry per peer; None if nothing live remains.

    Beyond ``MAX_ENTRIES_PER_VALUE`` peers, the entries expiring soonest are dropped.
    """
    best = valid_entries(values, key=key, now=now)
    if not best:
        return None
    kept = sorted(best.values(), key=lambda eb: eb[0].expires, reverse=True)
    kept = kept[:MAX_ENTRIES_PER_VALUE]
    return encode_value(blob for _e, blob in sorted(kept, key=lambda eb: eb[0].peer_id))


def has_news(old: bytes | None, new: bytes, *, key: str, now: float | None = None) -> bool:
    """True when ``new`` holds a live entry fresher than ``old``'s entry from that peer."""
    now = time.time() if now is None else now
    old_best = valid_entries([old], key=key, now=now) if old is not None else {}
    for pid, (e, _b) in valid_entries([new], key=key, now=now).items():
        prev = old_best.get(pid)
        if prev is None or e.freshness() > prev[0].freshness():
            return True
    return False


def check_value(key: str, value: bytes, now: float | None = None) -> None:
    """Strict check for an incoming PUT: every entry valid and for this key; one live.

    Raises RecordError. (Readers use the lenient ``valid_entries`` instead.)
    """
    blobs = decode_value(value)
    if not blobs:
        raise MalformedRecordError("value holds no entries")
    now = time.time() if now is None else now
    live = 0
    for blob in blobs:
        e = verify_entry(blob, key=key, now=now, allow_expired=True)
        live += e.alive(now)
    if not live:
        raise ExpiredRecordError("value holds no live entry")

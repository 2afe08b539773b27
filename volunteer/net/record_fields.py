"""What one registry entry is (``ServerEntry``), the bounds of each field, and the drops.

A signature proves who wrote an entry, not that the writer is honest, so ``decode_payload``
checks every field a reader uses against strict bounds before it builds a ``ServerEntry``:
names (charset, length), numbers (finite, within [0, cap]), addresses (count, length, parse
as multiaddrs; the ZeroMQ endpoint as ``tcp://host:port`` with a valid port), the optional
admission token (bytes, bounded). A validator raises ``MalformedRecordError`` whose
``reason`` names what was wrong; lenient callers drop the entry and count the reason in a
``RecordStats`` (thread-safe counters the node shows), never raising into a lookup.
Signatures, keys, values and merging are in ``records.py``.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
from multiaddr import Multiaddr

MAX_TTL = 3600.0  # default bound on how far ahead an entry may expire (the experiment's TTL)
CLOCK_SKEW = 60.0  # tolerated clock difference between peers, on top of the TTL
MAX_ENTRY_BYTES = 8192
MAX_ENTRIES_PER_VALUE = 256  # entries in one DHT value (decode bound) and per key (store cap)
MAX_CHILDREN = 512
MAX_ADDRS = 16
MAX_ADDR_CHARS = 512
MAX_STR = 512
MAX_NAME_CHARS = 64  # one uid component (a prefix segment or a child)
MAX_UID_CHARS = 255  # prefix + child
MAX_EXPERIMENT_CHARS = 128
MAX_PEER_ID_CHARS = 128
MAX_LOAD = 1.0  # load is the fill of the fullest task queue, in [0, 1]
MAX_SEQ = 2**63 - 1
MAX_FREE_SLOTS = 4096
MAX_SHARD_VERSION = 2**53
MAX_TOKEN_BYTES = 1024
ROOT_BYTES = 32
STATES = ("serving", "draining", "paused")  # paused: experts loaded, no new work taken
REACHABILITY = ("public", "private", "unknown")

_COMPONENT_RE = re.compile(rf"^[A-Za-z0-9_-]{{1,{MAX_NAME_CHARS}}}$")
_EXPERIMENT_RE = re.compile(rf"^[A-Za-z0-9_.:+-]{{1,{MAX_EXPERIMENT_CHARS}}}$")
_PEER_ID_RE = re.compile(rf"^[1-9A-HJ-NP-Za-km-z]{{1,{MAX_PEER_ID_CHARS}}}$")  # base58
_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253})$")

# Why an entry was dropped (the keys of ``RecordStats.as_dict()``).
REASONS = (
    "bad_value",  # a DHT value that is not a bounded msgpack map of entry blobs
    "too_many_entries",  # more entries in one value than MAX_ENTRIES_PER_VALUE
    "bad_entry",  # an entry that is not [payload, signature] msgpack, or too large
    "bad_name",  # experiment, prefix, child or peer id outside charset or length
    "bad_number",  # seq, expiry, load, free slots: wrong type, non-finite or out of range
    "bad_field",  # state, reachability, lists of the wrong type or size
    "bad_addr",  # too many addresses, too long, or not a multiaddr
    "bad_zmq",  # the ZeroMQ endpoint is not tcp://host:port with a valid port
    "bad_shard",  # a shard triple that is malformed or names an unlisted child
    "bad_token",  # the admission token is not bytes of bounded size
    "forged",  # the signature does not verify with the peer id's key
    "wrong_key",  # filed under the key of another prefix or experiment
    "expired",  # past its expiry
    "too_far_ahead",  # expires later than the experiment's TTL allows
    "not_admitted",  # refused by the experiment's admission filter
    "stale",  # older than the entry already held from that peer (a replay)
    "key_full",  # the key holds its maximum of live entries: newcomers wait for a free slot
    "signer_quota",  # that signer already fills its share of this node's DHT store
    "store_full",  # this node's DHT store is at its byte limit
)


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
    token: bytes | None = None

    def shard(self, child: str) -> ShardInfo | None:
        """The shard this server announces for ``child`` (None when it announces none)."""
        for info in self.shards:
            if info.child == child:
                return info
        return None

    def alive(self, now: float | None = None) -> bool:
        return self.expires >= (time.time() if now is None else now)

    @property
    def withdrawn(self) -> bool:
        """A tombstone: lists no children (readers never pick it as a server)."""
        return not self.children

    def freshness(self) -> tuple[int, float]:
        return (self.seq, self.expires)


def freshest_per_peer(entries: Iterable[ServerEntry], skip: str | None = None) -> list[ServerEntry]:
    """One entry per peer (its freshest: highest seq, then expiry), leaving out peer ``skip``:
    a peer counts once however many of its entries a lookup returns."""
    best: dict[str, ServerEntry] = {}
    for e in entries:
        if e.peer_id == skip:
            continue
        old = best.get(e.peer_id)
        if old is None or e.freshness() > old.freshness():
            best[e.peer_id] = e
    return list(best.values())


class RecordError(ValueError):
    """An entry or value that a reader must reject; ``reason`` is one of ``REASONS``."""

    reason = "bad_entry"

    def __init__(self, message: str = "", reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class MalformedRecordError(RecordError):
    """Not decodable, wrong types, or out of bounds."""


class ForgedRecordError(RecordError):
    """Signature does not verify with the announcing peer's key."""

    reason = "forged"


class ExpiredRecordError(RecordError):
    """Past its expiry, or expiring implausibly far in the future."""

    reason = "expired"


class WrongKeyError(RecordError):
    """Filed under a key of another prefix or experiment."""

    reason = "wrong_key"


class NotAdmittedError(RecordError):
    """Refused by the experiment's admission filter."""

    reason = "not_admitted"


class StoreRefusedError(RecordError):
    """A DHT server refused to store an entry (key full, signer quota, store full)."""

    reason = "key_full"


class RecordStats:
    """Thread-safe counters of dropped entries, by reason (see ``REASONS``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def count(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self._counts[reason] += n

    def get(self, reason: str) -> int:
        with self._lock:
            return self._counts[reason]

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        """reason -> count, only the reasons seen so far (JSON-serialisable)."""
        with self._lock:
            return {k: v for k, v in sorted(self._counts.items()) if v}


def malformed(reason: str, message: str) -> MalformedRecordError:
    return MalformedRecordError(message, reason=reason)


def check_experiment(v: Any) -> str:
    if not isinstance(v, str) or not _EXPERIMENT_RE.match(v):
        raise malformed("bad_name", "experiment must be 1-128 chars of [A-Za-z0-9_.:+-]")
    return v


def check_child(v: Any) -> str:
    """One uid component under a prefix: ``[A-Za-z0-9_-]{1,64}``."""
    if not isinstance(v, str) or not _COMPONENT_RE.match(v):
        raise malformed("bad_name", f"child names must be 1-{MAX_NAME_CHARS} chars of [A-Za-z0-9_-]")
    return v


def check_prefix(v: Any) -> str:
    """A prefix query: "" or dot-terminated components (``demo.ffn.3.``)."""
    if not isinstance(v, str) or len(v) >= MAX_UID_CHARS:
        raise malformed("bad_name", f"prefix must be a string of < {MAX_UID_CHARS} chars")
    if v and (not v.endswith(".") or not all(_COMPONENT_RE.match(p) for p in v[:-1].split("."))):
        raise malformed("bad_name", "prefix must be dot-terminated components of [A-Za-z0-9_-]")
    return v


def check_peer_id(v: Any) -> str:
    if not isinstance(v, str) or not _PEER_ID_RE.match(v):
        raise malformed("bad_name", f"peer id must be <= {MAX_PEER_ID_CHARS} base58 chars")
    return v


def check_children(v: Any, prefix: str) -> tuple[str, ...]:
    """Distinct valid children, at most MAX_CHILDREN, each forming a uid of bounded length."""
    if not isinstance(v, list) or len(v) > MAX_CHILDREN:
        raise malformed("bad_field", f"children must be a list of <= {MAX_CHILDREN} names")
    out = tuple(check_child(c) for c in v)
    if len(set(out)) != len(out):
        raise malformed("bad_name", "a child is listed twice")
    if any(len(prefix) + len(c) > MAX_UID_CHARS for c in out):
        raise malformed("bad_name", f"uids must be <= {MAX_UID_CHARS} chars")
    return out


def check_int(v: Any, name: str, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise malformed("bad_number", f"field {name!r} must be an int in [{lo}, {hi}]")
    return v


def check_float(v: Any, name: str, lo: float, hi: float) -> float:
    if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
            or not lo <= v <= hi):
        raise malformed("bad_number", f"field {name!r} must be a finite number in [{lo}, {hi}]")
    return float(v)


def check_choice(v: Any, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise malformed("bad_field", f"field {name!r} must be one of {choices}")
    return v


def check_addrs(v: Any) -> tuple[str, ...]:
    """At most MAX_ADDRS multiaddrs, each of bounded length and parseable."""
    if not isinstance(v, list) or len(v) > MAX_ADDRS:
        raise malformed("bad_addr", f"addresses must be a list of <= {MAX_ADDRS}")
    for a in v:
        if not isinstance(a, str) or not 0 < len(a) <= MAX_ADDR_CHARS or not a.startswith("/"):
            raise malformed("bad_addr", f"an address must be a multiaddr of <= {MAX_ADDR_CHARS} chars")
        try:
            Multiaddr(a)
        except Exception:  # multiaddr raises several types on garbage; all mean the same
            raise malformed("bad_addr", f"address {a[:80]!r} is not a multiaddr") from None
    return tuple(v)


def check_zmq(v: Any) -> str | None:
    """None, or ``tcp://host:port`` (IPv6 hosts in brackets) with a port in [1, 65535]."""
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > MAX_STR or not v.startswith("tcp://"):
        raise malformed("bad_zmq", "zmq endpoint must be tcp://host:port")
    host, sep, port = v[len("tcp://"):].rpartition(":")
    if (not sep or not _HOST_RE.match(host) or not port.isdigit() or len(port) > 5
            or not 0 < int(port) < 65536):
        raise malformed("bad_zmq", "zmq endpoint must be tcp://host:port with a valid port")
    return v


def check_token(v: Any) -> bytes | None:
    """None, or the admission token: bytes of at most MAX_TOKEN_BYTES."""
    if v is None:
        return None
    if not isinstance(v, bytes) or not 0 < len(v) <= MAX_TOKEN_BYTES:
        raise malformed("bad_token", f"admission token must be 1-{MAX_TOKEN_BYTES} bytes")
    return v


def _shard_list(obj: dict, children: tuple[str, ...]) -> tuple[ShardInfo, ...]:
    """Field ``h``: [[child, version, root], ...], each child listed in ``c`` at most once."""
    v = obj.get("h", [])
    if not isinstance(v, list) or len(v) > MAX_CHILDREN:
        raise malformed("bad_shard", f"field 'h' must be a list of <= {MAX_CHILDREN} items")
    out: list[ShardInfo] = []
    seen: set[str] = set()
    listed = set(children)
    for item in v:
        if not isinstance(item, list) or len(item) != 3:
            raise malformed("bad_shard", "field 'h' must hold [child, version, root] triples")
        child, version, root = item
        if not isinstance(child, str) or child not in listed or child in seen:
            raise malformed("bad_shard", "field 'h' names a child not listed in 'c' (or twice)")
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= MAX_SHARD_VERSION:
            raise malformed("bad_shard", f"shard version must be an int in [0, {MAX_SHARD_VERSION}]")
        if not isinstance(root, bytes) or len(root) != ROOT_BYTES:
            raise malformed("bad_shard", f"shard root must be {ROOT_BYTES} bytes")
        seen.add(child)
        out.append(ShardInfo(child, version, root))
    return tuple(out)


def decode_payload(payload: bytes) -> ServerEntry:
    """Every field checked against its bounds (``record_fields``) before it is used."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as e:
        raise malformed("bad_entry", f"entry payload is not msgpack: {type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise malformed("bad_entry", "entry payload must be a map")
    prefix = check_prefix(obj.get("p"))
    children = check_children(obj.get("c"), prefix)
    return ServerEntry(
        experiment=check_experiment(obj.get("x")),
        prefix=prefix,
        peer_id=check_peer_id(obj.get("id")),
        seq=check_int(obj.get("seq"), "seq", 0, MAX_SEQ),
        expires=check_float(obj.get("exp"), "exp", 0.0, 1e12),
        children=children,
        state=check_choice(obj.get("s"), "s", STATES),
        load=check_float(obj.get("l"), "l", 0.0, MAX_LOAD),
        addrs=check_addrs(obj.get("a")),
        zmq=check_zmq(obj.get("z")),
        reachability=check_choice(obj.get("r"), "r", REACHABILITY),
        shards=_shard_list(obj, children),
        free=check_int(obj.get("f", 0), "f", 0, MAX_FREE_SLOTS),
        token=check_token(obj.get("adm")),
    )

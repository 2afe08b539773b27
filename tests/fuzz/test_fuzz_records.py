"""Fuzzing DHT record decoding and merging (``volunteer.net.records``).

Inputs are random bytes, byte-level mutations of valid entries and values, and -- the
inputs a signature does not stop -- *validly signed* entries whose payload fields were
replaced by hostile values (huge lists, NaN, negative or far-future expiry, wrong types,
unknown keys, another peer's id), signed by Ed25519 and secp256k1 keys.

Property: ``decode_value``, ``verify_entry`` and ``check_value`` return or raise a
``RecordError`` subclass (``MalformedRecordError``, ``ForgedRecordError``,
``ExpiredRecordError``, ``WrongKeyError``), never anything else; ``valid_entries``,
``merge_values`` and ``has_news`` never raise; every entry they let through is sane (the
bounds below) and a merged value re-verifies entry by entry.
"""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair as ed25519_pair
from libp2p.crypto.secp256k1 import create_new_key_pair as secp256k1_pair
from libp2p.peer.id import ID

from tests.fuzz.profile import fuzz_settings
from tests.fuzz.strategies import msgpack_values, mutated
from volunteer.net import records
from volunteer.net.records import (
    DOMAIN,
    RecordError,
    ServerEntry,
    check_value,
    decode_value,
    dht_key,
    encode_value,
    has_news,
    merge_values,
    sign_entry,
    valid_entries,
    verify_entry,
)

pytestmark = pytest.mark.timeout(180)

NOW = 1_800_000_000.0
EXPERIMENT, PREFIX = "demo", "demo.ffn."
KEY = dht_key(EXPERIMENT, PREFIX)
KEYS = [ed25519_pair(), ed25519_pair(), secp256k1_pair()]
PEERS = [ID.from_pubkey(k.public_key).to_base58() for k in KEYS]
FIELDS = ("x", "p", "id", "seq", "exp", "c", "s", "l", "a", "z", "r", "h", "f")


def entry_for(i: int, seq: int = 1, ttl: float = 60.0, children: tuple[str, ...] = ("1", "2")
              ) -> ServerEntry:
    return ServerEntry(EXPERIMENT, PREFIX, PEERS[i], seq, NOW + ttl, children, "serving", 0.5,
                       addrs=(f"/ip4/127.0.0.1/tcp/400{i}/p2p/{PEERS[i]}",), zmq="tcp://127.0.0.1:5555",
                       reachability="public", shards=((records.ShardInfo("1", 3, bytes(32))),), free=2)


VALID_BLOBS = [sign_entry(entry_for(i), KEYS[i].private_key) for i in range(len(KEYS))]
VALID_VALUE = encode_value(VALID_BLOBS)


def payload_of(entry: ServerEntry) -> dict:
    blob = sign_entry(entry, KEYS[PEERS.index(entry.peer_id)].private_key)
    return msgpack.unpackb(msgpack.unpackb(blob)[0], raw=False)


def sign_payload(payload: dict, signer: int) -> bytes:
    raw = msgpack.packb(payload, use_bin_type=True)
    return msgpack.packb([raw, KEYS[signer].private_key.sign(DOMAIN + raw)], use_bin_type=True)


hostile_field = st.one_of(
    msgpack_values,
    st.integers(records.MAX_CHILDREN - 1, records.MAX_CHILDREN + 2).map(
        lambda n: [str(i) for i in range(n)]),
    st.integers(records.MAX_STR - 1, records.MAX_STR + 2).map(lambda n: "a" * n),
    st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 1e308, 2**63, -(2**63), 0,
                     NOW - 1.0, NOW + records.MAX_TTL + 61.0, NOW + 10 * records.MAX_TTL]),
    st.lists(st.tuples(st.sampled_from(["1", "2", "9"]), st.integers(-1, 2**64 - 1),
                       st.binary(min_size=31, max_size=33)).map(list), max_size=4),
    st.sampled_from([*PEERS, "", "Qm" + "1" * 44, "12D3KooW" + "x" * 44]),
)


@st.composite
def signed_hostile_entries(draw: st.DrawFn) -> bytes:
    """A valid payload with 1-3 fields replaced, removed or added, signed by some key."""
    signer = draw(st.integers(0, len(KEYS) - 1))
    payload = payload_of(entry_for(signer, seq=draw(st.integers(0, 5))))
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from((*FIELDS, "junk")))
        if draw(st.integers(0, 5)) == 0:
            payload.pop(field, None)
        else:
            payload[field] = draw(hostile_field)
    if draw(st.integers(0, 9)) == 0:  # announce under another peer's id
        payload["id"] = PEERS[(signer + 1) % len(PEERS)]
    return sign_payload(payload, signer)


def assert_sane(entry: ServerEntry, now: float = NOW) -> None:
    """What a reader may rely on for every entry a record function lets through."""
    assert entry.experiment == EXPERIMENT and entry.prefix == PREFIX and entry.peer_id in PEERS
    assert isinstance(entry.seq, int) and 0 <= entry.seq < 2**63
    assert isinstance(entry.expires, float) and math.isfinite(entry.expires)
    assert entry.expires <= now + records.MAX_TTL + 60.0
    assert isinstance(entry.load, float) and math.isfinite(entry.load)
    assert entry.state in records.STATES and entry.reachability in records.REACHABILITY
    assert len(entry.children) <= records.MAX_CHILDREN and len(entry.addrs) <= records.MAX_ADDRS
    for s in (*entry.children, *entry.addrs, entry.zmq or ""):
        assert isinstance(s, str) and len(s) <= records.MAX_STR
    assert isinstance(entry.free, int) and 0 <= entry.free <= records.MAX_FREE_SLOTS
    listed = set(entry.children)
    for info in entry.shards:
        assert info.child in listed and len(info.root) == records.ROOT_BYTES
        assert 0 <= info.version <= records.MAX_SHARD_VERSION


def check_entry(blob: bytes) -> None:
    for allow_expired in (False, True):
        try:
            entry = verify_entry(blob, key=KEY, now=NOW, allow_expired=allow_expired)
        except RecordError:
            continue
        assert_sane(entry)
        assert allow_expired or entry.expires >= NOW


def check_values(values: list[bytes]) -> None:
    """Readers and merging over ``values``: no exception, only sane entries, and a merged
    value that a strict PUT check accepts entry by entry."""
    for value in values:
        try:
            blobs = decode_value(value)
        except RecordError:
            continue
        assert len(blobs) <= records.MAX_ENTRIES_PER_VALUE
        try:
            check_value(KEY, value, now=NOW)
        except RecordError:
            pass
    best = valid_entries(values, key=KEY, now=NOW)
    for pid, (entry, blob) in best.items():
        assert entry.peer_id == pid and entry.expires >= NOW
        assert_sane(entry)
        assert verify_entry(blob, key=KEY, now=NOW) == entry
    merged = merge_values(values, key=KEY, now=NOW)
    if merged is None:
        assert not best
        return
    blobs = decode_value(merged)
    assert 1 <= len(blobs) <= records.MAX_ENTRIES_PER_VALUE
    entries = [verify_entry(b, key=KEY, now=NOW) for b in blobs]
    assert len({e.peer_id for e in entries}) == len(entries)  # one entry per peer
    for e in entries:
        assert_sane(e)
    check_value(KEY, merged, now=NOW)
    for old in (None, *values[:2]):
        assert has_news(old, merged, key=KEY, now=NOW) in (True, False)


@fuzz_settings()
@given(st.one_of(st.binary(max_size=200), msgpack_values.map(
    lambda v: msgpack.packb(v, use_bin_type=True))))
def test_entry_and_value_decoders_on_random_bytes(data: bytes) -> None:
    check_entry(data)
    check_values([data])
    check_values([encode_value([data]), data, VALID_VALUE])


@fuzz_settings()
@given(st.data())
def test_mutated_valid_entries_are_rejected_or_sane(data: st.DataObject) -> None:
    blob = data.draw(mutated(data.draw(st.sampled_from(VALID_BLOBS))))
    check_entry(blob)
    check_values([encode_value([blob]), encode_value([*VALID_BLOBS[:1], blob])])


@fuzz_settings()
@given(signed_hostile_entries())
def test_validly_signed_hostile_entries_are_rejected_or_sane(blob: bytes) -> None:
    check_entry(blob)
    check_values([encode_value([blob]), VALID_VALUE])


@fuzz_settings(0.5)
@given(st.lists(st.one_of(signed_hostile_entries(), st.sampled_from(VALID_BLOBS),
                          st.binary(max_size=40)), max_size=6),
       st.data())
def test_merging_hostile_values_keeps_only_sane_entries(blobs: list[bytes], data: st.DataObject
                                                        ) -> None:
    values = [encode_value(blobs), VALID_VALUE]
    values.append(data.draw(mutated(values[0])))
    values.append(msgpack.packb({"v": 1, "e": data.draw(st.lists(msgpack_values, max_size=3))},
                                use_bin_type=True))
    check_values(data.draw(st.permutations(values)))

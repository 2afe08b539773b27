"""Records from strangers: validly signed but hostile entries, Sybil bursts, replays of
withdrawn entries, quotas per signer and per store, the TTL bound and admission.

Every hostile entry here carries a correct signature (keys are free): what must stop it is
the bounds on its fields and the merge rules, and every drop is counted by reason.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import msgpack
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from tests.fuzz.profile import fuzz_settings
from tests.fuzz.strategies import msgpack_values, mutated
from volunteer.net import dht_store, records
from volunteer.net.dht_store import MergingValueStore
from volunteer.net.records import (
    MalformedRecordError,
    NotAdmittedError,
    RecordError,
    RecordPolicy,
    RecordStats,
    ServerEntry,
    StoreRefusedError,
)
from volunteer.net.registry import ExpertRegistry

KEY = records.dht_key("exp", "ffn.")
ROOT = b"\x01" * 32


@pytest.fixture(scope="module")
def kp():
    return create_new_key_pair()


@pytest.fixture(scope="module")
def crowd():
    return [create_new_key_pair() for _ in range(40)]


def pid_of(kp) -> str:
    return ID.from_pubkey(kp.public_key).to_base58()


def signed(kp, **kw) -> bytes:
    """A valid entry under ``KEY`` (fields overridable)."""
    base = dict(experiment="exp", prefix="ffn.", peer_id=pid_of(kp), seq=1, expires=time.time() + 60.0,
                children=("1",), state="serving", load=0.5, addrs=("/ip4/127.0.0.1/tcp/1",),
                zmq="tcp://127.0.0.1:5555", reachability="public")
    base.update(kw)
    return records.sign_entry(ServerEntry(**base), kp.private_key)


def forge(kp, **fields) -> bytes:
    """A correctly signed entry whose payload map is built by hand (any field, any type)."""
    obj = {"x": "exp", "p": "ffn.", "id": pid_of(kp), "seq": 1, "exp": time.time() + 60.0,
           "c": ["1"], "s": "serving", "l": 0.5, "a": ["/ip4/127.0.0.1/tcp/1"],
           "z": "tcp://127.0.0.1:5555", "r": "public", "h": [], "f": 0}
    obj.update(fields)
    payload = msgpack.packb(obj, use_bin_type=True)
    return msgpack.packb([payload, kp.private_key.sign(records.DOMAIN + payload)], use_bin_type=True)


HOSTILE = [
    ({"p": "ffn"}, "bad_name"), ({"p": "ff n."}, "bad_name"), ({"p": "a" * 300 + "."}, "bad_name"),
    ({"p": 5}, "bad_name"), ({"p": "ffn..x."}, "bad_name"),
    ({"c": ["1.2"]}, "bad_name"), ({"c": [""]}, "bad_name"), ({"c": ["x" * 65]}, "bad_name"),
    ({"c": ["1", "1"]}, "bad_name"), ({"c": ["é"]}, "bad_name"), ({"c": [7]}, "bad_name"),
    ({"c": [str(i) for i in range(records.MAX_CHILDREN + 1)]}, "bad_field"), ({"c": "1"}, "bad_field"),
    ({"x": "a b"}, "bad_name"), ({"x": ""}, "bad_name"), ({"x": "x" * 200}, "bad_name"),
    ({"id": "0OIl"}, "bad_name"), ({"id": "1" * 200}, "bad_name"), ({"id": None}, "bad_name"),
    ({"l": float("nan")}, "bad_number"), ({"l": float("inf")}, "bad_number"), ({"l": -0.5}, "bad_number"),
    ({"l": 1.5}, "bad_number"), ({"l": 1e308}, "bad_number"), ({"l": "0"}, "bad_number"),
    ({"l": True}, "bad_number"), ({"l": None}, "bad_number"),
    ({"seq": -1}, "bad_number"), ({"seq": 2**64 - 1}, "bad_number"), ({"seq": True}, "bad_number"),
    ({"seq": 1.0}, "bad_number"),
    ({"exp": float("nan")}, "bad_number"), ({"exp": float("inf")}, "bad_number"),
    ({"exp": -1.0}, "bad_number"), ({"exp": "soon"}, "bad_number"),
    ({"f": 10**6}, "bad_number"), ({"f": -1}, "bad_number"),
    ({"s": "evil"}, "bad_field"), ({"r": "yes"}, "bad_field"), ({"s": None}, "bad_field"),
    ({"a": ["/ip4/1.2.3.4/tcp/1"] * (records.MAX_ADDRS + 1)}, "bad_addr"), ({"a": ["not-an-addr"]}, "bad_addr"),
    ({"a": ["/ip4/1.2.3.4/tcp/99999"]}, "bad_addr"), ({"a": ["/" + "a" * 600]}, "bad_addr"),
    ({"a": [5]}, "bad_addr"), ({"a": "x"}, "bad_addr"), ({"a": ["/ip4/999.1.1.1/tcp/1"]}, "bad_addr"),
    ({"z": "tcp://1.2.3.4:0"}, "bad_zmq"), ({"z": "tcp://1.2.3.4:65536"}, "bad_zmq"),
    ({"z": "tcp://1.2.3.4"}, "bad_zmq"), ({"z": "udp://1.2.3.4:5"}, "bad_zmq"),
    ({"z": "tcp://a b:5"}, "bad_zmq"), ({"z": "tcp://host:5x"}, "bad_zmq"), ({"z": 5}, "bad_zmq"),
    ({"z": "tcp://:5"}, "bad_zmq"), ({"z": "tcp://h:" + "1" * 40}, "bad_zmq"),
    ({"adm": "str"}, "bad_token"), ({"adm": b""}, "bad_token"),
    ({"adm": b"x" * (records.MAX_TOKEN_BYTES + 1)}, "bad_token"), ({"adm": 5}, "bad_token"),
    ({"h": [["1", 1]]}, "bad_shard"), ({"h": [["2", 1, ROOT]]}, "bad_shard"),
]


@pytest.mark.parametrize("fields,reason", HOSTILE, ids=lambda v: repr(v)[:50])
def test_hostile_field_is_dropped_counted_and_never_raised_into_a_lookup(kp, crowd, fields, reason):
    bad = forge(kp, **fields)
    with pytest.raises(MalformedRecordError) as err:
        records.verify_entry(bad, key=KEY)
    assert err.value.reason == reason
    good = signed(crowd[0])
    value = records.encode_value([bad, good])
    stats = RecordStats()
    assert list(records.valid_entries([value], key=KEY, stats=stats)) == [pid_of(crowd[0])]
    assert stats.as_dict() == {reason: 1}
    merged = records.merge_values([None, value], key=KEY, stats=stats)
    assert list(records.valid_entries([merged], key=KEY)) == [pid_of(crowd[0])]
    assert stats.get(reason) == 2
    with pytest.raises(MalformedRecordError):
        records.check_value(KEY, value, stats=stats)
    assert stats.get(reason) == 3


@pytest.mark.parametrize("fields", [
    {"l": 0.0}, {"l": 1}, {"f": records.MAX_FREE_SLOTS}, {"p": "", "c": ["solo"]},
    {"z": "tcp://[::1]:5555"}, {"z": "tcp://example.org:1"}, {"z": None}, {"a": []},
    {"a": ["/ip4/1.2.3.4/tcp/1"] * records.MAX_ADDRS}, {"adm": b"t" * records.MAX_TOKEN_BYTES},
    {"a": ["/ip4/1.2.3.4/tcp/1/p2p/12D3KooWGzBAE1hG8ZQx8ihb1r4xSwvKHwt5Y8qV7qvJVnoxWq3x/p2p-circuit"]},
    {"c": ["a_b-C"], "p": "layer_0.ffn-x."}, {"seq": 2**63 - 1},
], ids=lambda v: repr(v)[:50])
def test_edge_values_within_bounds_are_accepted(kp, fields):
    prefix = fields.get("p", "ffn.")
    e = records.verify_entry(forge(kp, **fields), key=records.dht_key("exp", prefix))
    assert e.peer_id == pid_of(kp)


def test_value_level_drops_are_counted(kp, crowd):
    stats = RecordStats()
    good = signed(kp)
    too_many = msgpack.packb({"v": 1, "e": [good] * (records.MAX_ENTRIES_PER_VALUE + 1)})
    forged = signed(kp, peer_id=pid_of(crowd[1]))
    values = [too_many, b"\xc1", msgpack.packb({"v": 2, "e": []}), None,
              records.encode_value([signed(crowd[2], expires=time.time() - 1), forged,
                                    signed(crowd[3], experiment="other"),
                                    signed(crowd[4], expires=time.time() + 10 * records.MAX_TTL),
                                    good])]
    assert list(records.valid_entries(values, key=KEY, stats=stats)) == [pid_of(kp)]
    assert stats.as_dict() == {"too_many_entries": 1, "bad_value": 2, "expired": 1, "forged": 1,
                               "wrong_key": 1, "too_far_ahead": 1}


def test_expiry_is_bounded_by_the_experiments_ttl(kp):
    in_2h = signed(kp, expires=time.time() + 7200)
    with pytest.raises(records.ExpiredRecordError) as err:
        records.verify_entry(in_2h)
    assert err.value.reason == "too_far_ahead"
    assert records.verify_entry(in_2h, max_ttl=7200).expires > time.time() + 3600
    stats = RecordStats()
    soon = records.encode_value([signed(kp, expires=time.time() + 200)])
    assert records.valid_entries([soon], key=KEY, max_ttl=30, stats=stats) == {}
    assert stats.as_dict() == {"too_far_ahead": 1}
    assert records.merge_values([None, soon], key=KEY, max_ttl=30) is None
    with pytest.raises(records.ExpiredRecordError):
        records.check_value(KEY, soon, max_ttl=30)
    dht = fake_dht(kp, RecordPolicy(max_ttl=30))
    with pytest.raises(ValueError):
        ExpertRegistry(dht, kp, "exp", ttl=60)
    assert ExpertRegistry(fake_dht(kp, RecordPolicy(max_ttl=7200)), kp, "exp", ttl=5000).ttl == 5000


def store_of(policy: RecordPolicy, **limits) -> MergingValueStore:
    return MergingValueStore(SimpleNamespace(), None, policy=policy, **limits)


def stored(store: MergingValueStore, key: str = KEY) -> dict[str, ServerEntry]:
    rec = store.get(key.encode())
    if rec is None:
        return {}
    return {p: e for p, (e, _b) in records.valid_entries([rec.value], key=key).items()}


def test_a_sybil_burst_cannot_push_honest_entries_out(crowd):
    stats = RecordStats()
    store = store_of(RecordPolicy(max_entries=8, stats=stats))
    honest, sybils = crowd[:4], crowd[4:34]
    short = signed(honest[0], expires=time.time() + 5)
    store.merge_in(KEY.encode(), records.encode_value([short]))
    for k in honest[1:]:
        store.merge_in(KEY.encode(), records.encode_value([signed(k)]))
    # 20 fresh keys in one burst: only the 4 free slots are taken
    store.merge_in(KEY.encode(), records.encode_value([signed(k) for k in sybils[:20]]))
    held = stored(store)
    assert len(held) == 8 and {pid_of(k) for k in honest} <= set(held)
    assert stats.get("key_full") == 16
    # a burst that finds no free slot is refused as a whole (the putter is not acknowledged)
    with pytest.raises(StoreRefusedError) as err:
        store.merge_in(KEY.encode(), records.encode_value([signed(k) for k in sybils[20:]]))
    assert err.value.reason == "key_full" and stats.get("key_full") == 26
    # a held peer refreshes its own entry while the key is full
    store.merge_in(KEY.encode(), records.encode_value([signed(honest[1], seq=2, children=("1", "2"))]))
    assert stored(store)[pid_of(honest[1])].children == ("1", "2")
    # the short-lived entry expires: its slot, and only that one, goes to a newcomer
    later = time.time() + 10
    store.merge_in(KEY.encode(), records.encode_value([signed(k) for k in sybils[20:]]), now=later)
    rec = store.get(KEY.encode())
    held = records.valid_entries([rec.value], key=KEY, now=later)
    assert len(held) == 8 and pid_of(honest[0]) not in held
    assert {pid_of(k) for k in honest[1:]} <= set(held)


def test_fair_merge_keeps_held_entries_first_in_pure_merge(crowd):
    held = records.encode_value([signed(k) for k in crowd[:3]])
    burst = records.encode_value([signed(k) for k in crowd[3:10]])
    stats = RecordStats()
    merged = records.merge_values([held, burst], key=KEY, max_entries=4, stats=stats)
    got = records.valid_entries([merged], key=KEY)
    assert len(got) == 4 and {pid_of(k) for k in crowd[:3]} <= set(got)
    assert stats.as_dict() == {"key_full": 6}


def fake_dht(kp, policy: RecordPolicy | None = None, store: MergingValueStore | None = None):
    pid = ID.from_pubkey(kp.public_key)
    value_store = store if store is not None else (store_of(policy) if policy else None)
    return SimpleNamespace(host=SimpleNamespace(get_id=lambda: pid), value_store=value_store)


def test_replaying_a_withdrawn_entry_does_not_bring_it_back(kp, monkeypatch):
    stats = RecordStats()
    store = store_of(RecordPolicy(stats=stats))
    clock = {"now": time.time()}

    async def publish(dht, key, value):
        return store.merge_in(key.encode(), value, now=clock["now"]) is not None

    monkeypatch.setattr(dht_store, "publish_value", publish)
    reg = ExpertRegistry(fake_dht(kp, store=store), kp, "exp", ttl=60.0)
    assert trio.run(reg.announce, ["ffn.1"]).ok
    (old,) = records.decode_value(store.get(KEY.encode()).value)
    served = records.verify_entry(old, key=KEY)
    assert served.children == ("1",)

    assert trio.run(reg.announce, []).ok  # withdraw ffn.
    tomb = stored(store)[pid_of(kp)]
    assert tomb.withdrawn and tomb.seq > served.seq and tomb.expires >= served.expires

    # 30 s later (a tombstone that "expires at once" would be gone): anyone replays `old`
    clock["now"] += 30.0
    with pytest.raises(StoreRefusedError):
        store.merge_in(KEY.encode(), records.encode_value([old]), now=clock["now"])
    assert stats.get("stale") == 1
    rec = store.get(KEY.encode())
    assert records.valid_entries([rec.value], key=KEY, now=clock["now"])[pid_of(kp)][0].withdrawn
    # a reader that gets the replay from another DHT server still sees the tombstone win
    both = records.valid_entries([records.encode_value([old]), rec.value], key=KEY, now=clock["now"])
    assert both[pid_of(kp)][0].withdrawn
    # once `old` has expired the tombstone may go, and the replay is refused as expired
    clock["now"] = served.expires + 1.0
    with pytest.raises(StoreRefusedError):
        store.merge_in(KEY.encode(), records.encode_value([old]), now=clock["now"])


def test_why_the_tombstone_must_outlive(kp):
    # The former withdrawal expired one second after it was made: after that, the replay
    # of the older, still-live entry was taken again. Kept as the attack's description.
    now = time.time()
    old = signed(kp, seq=1, expires=now + 60)
    brief = signed(kp, seq=2, children=(), state="draining", expires=now + 1)
    store = store_of(RecordPolicy())
    store.merge_in(KEY.encode(), records.encode_value([old]), now=now)
    store.merge_in(KEY.encode(), records.encode_value([brief]), now=now)
    store.merge_in(KEY.encode(), records.encode_value([old]), now=now + 30)
    rec = store.get(KEY.encode())
    assert records.valid_entries([rec.value], key=KEY, now=now + 30)[pid_of(kp)][0].children == ("1",)


def test_one_signer_fills_only_its_share_of_a_store(kp, crowd):
    stats = RecordStats()
    store = store_of(RecordPolicy(stats=stats), max_keys_per_signer=3)
    keys = [records.dht_key("exp", f"p{i}.") for i in range(5)]
    for key in keys[:3]:
        store.merge_in(key.encode(), records.encode_value([signed(kp, prefix=key_prefix(key, keys))]))
    with pytest.raises(StoreRefusedError):
        store.merge_in(keys[3].encode(), records.encode_value([signed(kp, prefix="p3.")]))
    assert stats.get("signer_quota") == 1 and store.signer_keys(pid_of(kp)) == 3
    store.merge_in(keys[3].encode(), records.encode_value([signed(crowd[0], prefix="p3.")]))  # others still can
    store.merge_in(keys[0].encode(), records.encode_value([signed(kp, prefix="p0.", seq=2)]))  # refresh: fine
    store.remove(keys[0].encode())
    assert store.signer_keys(pid_of(kp)) == 2
    store.merge_in(keys[4].encode(), records.encode_value([signed(kp, prefix="p4.")]))
    assert store.signer_keys(pid_of(kp)) == 3


def key_prefix(key: str, keys: list[str]) -> str:
    return f"p{keys.index(key)}."


def test_the_store_is_bounded_in_bytes(crowd):
    stats = RecordStats()
    one = len(records.encode_value([signed(crowd[0], prefix="p0.")]))
    store = store_of(RecordPolicy(stats=stats), max_store_bytes=3 * one + 10)
    for i in range(3):
        store.merge_in(records.dht_key("exp", f"p{i}.").encode(),
                       records.encode_value([signed(crowd[i], prefix=f"p{i}.")]))
    with pytest.raises(StoreRefusedError) as err:
        store.merge_in(records.dht_key("exp", "p3.").encode(),
                       records.encode_value([signed(crowd[3], prefix="p3.")]))
    assert err.value.reason == "store_full" and stats.as_dict() == {"store_full": 1}
    store.merge_in(records.dht_key("exp", "p1.").encode(),  # a refresh of the same size fits
                   records.encode_value([signed(crowd[1], prefix="p1.", seq=2)]))
    assert store.bytes_stored <= 3 * one + 10


def test_admission_filter_on_every_path(kp, crowd):
    def admit(e: ServerEntry) -> bool:
        if e.token == b"boom":
            raise ValueError("a hostile token broke the checker")
        return e.token == b"ticket"

    stats = RecordStats()
    member, stranger, breaker = signed(kp, token=b"ticket"), signed(crowd[0]), signed(crowd[1], token=b"boom")
    value = records.encode_value([member, stranger, breaker])
    assert list(records.valid_entries([value], key=KEY, admit=admit, stats=stats)) == [pid_of(kp)]
    assert stats.as_dict() == {"not_admitted": 2}
    assert len(records.valid_entries([value], key=KEY)) == 3  # open experiment: unchanged
    with pytest.raises(NotAdmittedError):
        records.check_value(KEY, records.encode_value([stranger]), admit=admit, stats=stats)
    records.check_value(KEY, records.encode_value([member]), admit=admit)
    store = store_of(RecordPolicy(admit=admit, stats=stats))
    with pytest.raises(StoreRefusedError):
        store.merge_in(KEY.encode(), records.encode_value([stranger]))
    store.merge_in(KEY.encode(), value)
    assert list(stored(store)) == [pid_of(kp)]
    # the validator in front of the store refuses the PUT outright
    validator = dht_store.RegistryValidator(RecordPolicy(admit=admit, stats=stats))
    with pytest.raises(NotAdmittedError):
        validator.validate(KEY, records.encode_value([stranger]))


def test_registry_puts_its_admission_token_into_every_entry(kp):
    reg = ExpertRegistry(fake_dht(kp), kp, "exp", admission_token=b"ticket")
    blob = reg.make_entry("ffn.", ["1"], state="serving", load=7.0, addrs=[], zmq=None,
                          reachability="unknown")
    e = records.verify_entry(blob, key=KEY)
    assert e.token == b"ticket" and e.load == records.MAX_LOAD  # load clamped to its bound
    assert records.verify_entry(ExpertRegistry(fake_dht(kp), kp, "exp").make_entry(
        "ffn.", ["1"], state="serving", load=float("nan"), addrs=[], zmq=None,
        reachability="unknown"), key=KEY).token is None
    with pytest.raises(ValueError):
        ExpertRegistry(fake_dht(kp), kp, "exp", admission_token=b"x" * (records.MAX_TOKEN_BYTES + 1))


def test_stats_are_thread_safe_counters():
    import threading

    stats = RecordStats()
    threads = [threading.Thread(target=lambda: [stats.count("forged") for _ in range(1000)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.as_dict() == {"forged": 4000} and stats.total() == 4000


@fuzz_settings()
@given(fields=st.dictionaries(st.sampled_from(["x", "p", "id", "seq", "exp", "c", "s", "l", "a", "z",
                                               "r", "h", "f", "adm", "?"]), msgpack_values, max_size=6))
def test_fuzz_any_signed_payload_is_a_valid_entry_or_a_counted_drop(kp, fields):
    blob = forge(kp, **fields)
    stats = RecordStats()
    try:
        e = records.verify_entry(blob, key=KEY)
    except RecordError:
        pass
    else:
        assert 0.0 <= e.load <= records.MAX_LOAD and len(e.addrs) <= records.MAX_ADDRS
    got = records.valid_entries([records.encode_value([blob])], key=KEY, stats=stats)
    assert len(got) + stats.total() == 1


@fuzz_settings(0.5)
@given(data=st.data())
def test_fuzz_mutated_values_never_raise_from_a_merge(kp, data):
    valid = records.encode_value([signed(kp), forge(kp, l=0.25)])
    value = data.draw(mutated(valid))
    records.valid_entries([value], key=KEY, stats=RecordStats())
    records.merge_values([value, value], key=KEY, stats=RecordStats())
    try:
        records.check_value(KEY, value, stats=RecordStats())
    except RecordError:
        pass

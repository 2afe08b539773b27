"""Signed registry entries: encoding, verification, merging (pure, no network)."""

from __future__ import annotations

import time

import msgpack
import pytest

from volunteer.net import records
from volunteer.net.host import load_or_create_identity, peer_id_of
from volunteer.net.records import ServerEntry


@pytest.fixture
def keys(tmp_path):
    return [load_or_create_identity(tmp_path / str(i)) for i in range(3)]


def entry(key_pair, *, prefix="ffn.", children=("1",), seq=1, ttl=60.0, experiment="exp",
          state="serving", load=0.0, peer_id=None):
    return ServerEntry(experiment=experiment, prefix=prefix,
                       peer_id=peer_id or peer_id_of(key_pair).to_base58(), seq=seq,
                       expires=time.time() + ttl, children=tuple(children), state=state,
                       load=load, addrs=("/ip4/127.0.0.1/tcp/1",), zmq="tcp://127.0.0.1:2",
                       reachability="public")


def test_index_pairs():
    assert records.index_pairs("demo.ffn.3.7") == [("demo.ffn.", "3"), ("demo.ffn.3.", "7")]
    assert records.index_pairs("layer.0.ffn.3") == [("layer.0.ffn.", "3")]
    assert records.index_pairs("a.b") == [("a.", "b")]
    assert records.index_pairs("solo") == [("", "solo")]
    assert records.parent_pair("ffn.1.2") == ("ffn.1.", "2")
    with pytest.raises(ValueError):
        records.index_pairs("a..b")


def test_sign_verify_roundtrip(keys):
    e = entry(keys[0])
    blob = records.sign_entry(e, keys[0].private_key)
    got = records.verify_entry(blob, key=records.dht_key("exp", "ffn."))
    assert got == ServerEntry(**{**e.__dict__, "expires": float(e.expires)})


def test_forged_entry_rejected(keys):
    # Claims to be keys[0]'s peer but is signed by keys[1].
    blob = records.sign_entry(entry(keys[0]), keys[1].private_key)
    with pytest.raises(records.ForgedRecordError):
        records.verify_entry(blob)


def test_tampered_entry_rejected(keys):
    blob = records.sign_entry(entry(keys[0], load=0.0), keys[0].private_key)
    payload, sig = msgpack.unpackb(blob)
    obj = msgpack.unpackb(payload)
    obj["l"] = 0.5
    tampered = msgpack.packb([msgpack.packb(obj), sig])
    with pytest.raises(records.ForgedRecordError):
        records.verify_entry(tampered)


def test_expired_and_far_future_rejected(keys):
    old = records.sign_entry(entry(keys[0], ttl=-1), keys[0].private_key)
    with pytest.raises(records.ExpiredRecordError):
        records.verify_entry(old)
    far = records.sign_entry(entry(keys[0], ttl=10 * records.MAX_TTL), keys[0].private_key)
    with pytest.raises(records.ExpiredRecordError):
        records.verify_entry(far)


def test_wrong_key_or_experiment_rejected(keys):
    blob = records.sign_entry(entry(keys[0], experiment="other"), keys[0].private_key)
    with pytest.raises(records.WrongKeyError):
        records.verify_entry(blob, key=records.dht_key("exp", "ffn."))


@pytest.mark.parametrize("garbage", [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb([b"x", b"y"]),
                                     b"\x00" * (records.MAX_ENTRY_BYTES + 1)])
def test_garbage_entries_are_malformed(garbage):
    with pytest.raises(records.RecordError):
        records.verify_entry(garbage)


def test_merge_keeps_freshest_per_peer_and_drops_bad(keys):
    key = records.dht_key("exp", "ffn.")
    a1 = records.sign_entry(entry(keys[0], seq=1, children=("1",)), keys[0].private_key)
    a2 = records.sign_entry(entry(keys[0], seq=2, children=("2",)), keys[0].private_key)
    b1 = records.sign_entry(entry(keys[1], seq=1), keys[1].private_key)
    forged = records.sign_entry(entry(keys[2]), keys[0].private_key)
    dead = records.sign_entry(entry(keys[2], ttl=-5), keys[2].private_key)
    v1 = records.encode_value([a2, b1])
    v2 = records.encode_value([a1, forged, dead])
    merged = records.merge_values([v2, v1, b"garbage"], key=key)
    best = records.valid_entries([merged], key=key)
    assert set(best) == {peer_id_of(keys[0]).to_base58(), peer_id_of(keys[1]).to_base58()}
    assert best[peer_id_of(keys[0]).to_base58()][0].children == ("2",)
    assert records.has_news(v2, v1, key=key)
    assert not records.has_news(merged, v2, key=key)
    # Strict check (DHT servers, on PUT): any forged entry rejects the value.
    with pytest.raises(records.ForgedRecordError):
        records.check_value(key, v2)
    records.check_value(key, v1)
    with pytest.raises(records.ExpiredRecordError):
        records.check_value(key, records.encode_value([dead]))

"""Shard announcements in registry entries (fields ``h`` and ``f``): signing, strict
verification of hostile payloads, old-format entries, and where ``announce`` files them."""

from __future__ import annotations

import hashlib
import time
from types import SimpleNamespace

import msgpack
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from volunteer.net import dht_store, records
from volunteer.net.records import (
    MAX_FREE_SLOTS,
    MAX_SHARD_VERSION,
    MalformedRecordError,
    ServerEntry,
    ShardInfo,
)
from volunteer.net.registry import ExpertRegistry

R1 = hashlib.sha256(b"one").digest()
R2 = hashlib.sha256(b"two").digest()
DROP = object()


@pytest.fixture(scope="module")
def kp():
    return create_new_key_pair()


def pid_of(kp) -> str:
    return ID.from_pubkey(kp.public_key).to_base58()


def entry(kp, **kw) -> ServerEntry:
    base = dict(experiment="exp", prefix="g.0.", peer_id=pid_of(kp), seq=1, expires=time.time() + 60.0,
                children=("1", "2"), state="serving", load=0.25, addrs=("/ip4/127.0.0.1/tcp/1",),
                zmq=None, reachability="public", shards=(ShardInfo("1", 3, R1), ShardInfo("2", 0, R2)), free=2)
    base.update(kw)
    return ServerEntry(**base)


def forge(kp, **fields) -> bytes:
    """A correctly signed entry whose payload map is built by hand (``DROP`` removes a key)."""
    obj = {"x": "exp", "p": "g.0.", "id": pid_of(kp), "seq": 1, "exp": time.time() + 60.0, "c": ["1", "2"],
           "s": "serving", "l": 0.0, "a": [], "z": None, "r": "unknown", "h": [["1", 3, R1]], "f": 2}
    for k, v in fields.items():
        if v is DROP:
            obj.pop(k, None)
        else:
            obj[k] = v
    payload = msgpack.packb(obj, use_bin_type=True)
    return msgpack.packb([payload, kp.private_key.sign(records.DOMAIN + payload)], use_bin_type=True)


def test_shards_and_free_roundtrip(kp):
    e = entry(kp)
    got = records.verify_entry(records.sign_entry(e, kp.private_key), key=records.dht_key("exp", "g.0."))
    assert got == e
    assert got.shards == (ShardInfo("1", 3, R1), ShardInfo("2", 0, R2)) and got.free == 2
    assert got.shard("1") == ShardInfo("1", 3, R1)
    assert got.shard("2").root == R2
    assert got.shard("3") is None
    edge = entry(kp, shards=(ShardInfo("1", MAX_SHARD_VERSION, R1),), free=MAX_FREE_SLOTS)
    assert records.verify_entry(records.sign_entry(edge, kp.private_key)) == edge


def test_hand_built_payload_verifies(kp):
    got = records.verify_entry(forge(kp))
    assert got.shards == (ShardInfo("1", 3, R1),) and got.free == 2


def test_old_format_entry_without_shards_or_free_still_verifies(kp):
    got = records.verify_entry(forge(kp, h=DROP, f=DROP))
    assert got.shards == () and got.free == 0 and got.children == ("1", "2")
    assert got.shard("1") is None


@pytest.mark.parametrize("fields", [
    {"h": [["3", 1, R1]]},  # child not listed in c
    {"h": [["1", 1, R1], ["1", 2, R2]]},  # child twice
    {"h": [["1", -1, R1]]},
    {"h": [["1", MAX_SHARD_VERSION + 1, R1]]},
    {"h": [["1", True, R1]]},
    {"h": [["1", 1.0, R1]]},
    {"h": [["1", 1, R1[:31]]]},
    {"h": [["1", 1, R1 + b"\x00"]]},
    {"h": [["1", 1, R1.hex()]]},
    {"h": [["1", 1]]},
    {"h": [["1", 1, R1, 0]]},
    {"h": [[1, 1, R1]]},
    {"h": ["1"]},
    {"h": {"1": [1, R1]}},
    {"h": None},
    {"h": [["1", 1, R1]] * (records.MAX_CHILDREN + 1)},
    {"f": -1},
    {"f": MAX_FREE_SLOTS + 1},
    {"f": True},
    {"f": 1.5},
    {"f": "3"},
    {"f": None},
], ids=lambda f: repr(f)[:40])
def test_bad_shard_or_free_fields_are_malformed(kp, fields):
    with pytest.raises(MalformedRecordError):
        records.verify_entry(forge(kp, **fields))


def test_bad_entry_does_not_hide_good_ones_in_a_value(kp):
    other = create_new_key_pair()
    key = records.dht_key("exp", "g.0.")
    good = records.sign_entry(entry(other), other.private_key)
    value = records.encode_value([forge(kp, f=-5), good])
    best = records.valid_entries([value], key=key)
    assert list(best) == [pid_of(other)]
    with pytest.raises(MalformedRecordError):
        records.check_value(key, value)


# -- ExpertRegistry.announce files shard infos under the parent prefix --------------------


class Published:
    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    async def __call__(self, dht, key, value):
        self.values[key] = value
        return 1

    def entry(self, experiment: str, prefix: str) -> ServerEntry:
        key = records.dht_key(experiment, prefix)
        (blob,) = records.decode_value(self.values[key])
        return records.verify_entry(blob, key=key)


@pytest.fixture
def registry(kp, monkeypatch):
    published = Published()
    monkeypatch.setattr(dht_store, "publish_value", published)
    pid = ID.from_pubkey(kp.public_key)
    dht = SimpleNamespace(host=SimpleNamespace(get_id=lambda: pid))
    return ExpertRegistry(dht, kp, "exp"), published


def test_announce_puts_shards_only_into_parent_entries(registry):
    reg, published = registry
    uids = ["g.0.1", "g.0.2", "g.1.0", "solo"]
    shards = {"g.0.1": (3, R1), "g.1.0": (5, R2), "solo": (7, R1), "g.9.9": (1, R2)}  # g.9.9 not hosted
    report = trio.run(lambda: reg.announce(uids, shards=shards, free=3))
    assert report.ok and report.keys == 4
    top = published.entry("exp", "g.")
    assert top.children == ("0", "1") and top.shards == () and top.free == 3
    g0 = published.entry("exp", "g.0.")
    assert g0.children == ("1", "2") and g0.shards == (ShardInfo("1", 3, R1),) and g0.free == 3
    assert g0.shard("2") is None  # hosted, but no shard announced for it
    g1 = published.entry("exp", "g.1.")
    assert g1.children == ("0",) and g1.shards == (ShardInfo("0", 5, R2),)
    root = published.entry("exp", "")
    assert root.children == ("solo",) and root.shards == (ShardInfo("solo", 7, R1),)
    assert records.dht_key("exp", "g.9.") not in published.values


def test_announce_sorts_shards_and_clamps_free(registry):
    reg, published = registry
    uids = ["g.0.10", "g.0.2", "g.0.1"]
    trio.run(lambda: reg.announce(uids, shards={u: (1, R1) for u in uids}, free=10**9))
    g0 = published.entry("exp", "g.0.")
    assert [i.child for i in g0.shards] == sorted(["10", "2", "1"])
    assert g0.free == MAX_FREE_SLOTS
    trio.run(lambda: reg.announce(uids, free=-4))
    assert published.entry("exp", "g.0.").free == 0
    assert published.entry("exp", "g.0.").shards == ()


def test_announce_many_experts_of_one_prefix_without_shards(registry):
    reg, published = registry
    uids = [f"d.{i}" for i in range(records.MAX_CHILDREN)]
    assert trio.run(lambda: reg.announce(uids)).ok
    assert len(published.entry("exp", "d.").children) == records.MAX_CHILDREN


def test_announce_many_experts_of_one_prefix_with_shards(registry):
    # ~45 bytes of shard info per child: 200 of them do not fit one entry's byte budget. The
    # entry still lists every child and carries as many shards as fit, in child order; the
    # other prefixes' entries are published as well.
    reg, published = registry
    uids = [f"d.{i}" for i in range(200)] + ["e.0"]  # num_experts allows up to 4096, MAX_CHILDREN is 512
    shards = {u: (10**9, hashlib.sha256(u.encode()).digest()) for u in uids}
    assert trio.run(lambda: reg.announce(uids, shards=shards, free=1)).ok
    e = published.entry("exp", "d.")
    assert len(e.children) == 200
    assert 100 < len(e.shards) < 200 and [i.child for i in e.shards] == sorted(e.children)[: len(e.shards)]
    assert all(i.root == shards[f"d.{i.child}"][1] for i in e.shards)
    assert reg.shards_left_out == {"d.": 200 - len(e.shards)}
    assert published.entry("exp", "e.").shards == (ShardInfo("0", 10**9, shards["e.0"][1]),)

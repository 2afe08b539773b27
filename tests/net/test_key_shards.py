"""Sharded prefix keys (``key_shards``): where entries may be filed, how readers combine
keys, and that ``ExpertRegistry`` writes both keys and reads the shards of a full prefix."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from volunteer.net import dht_store, key_shards, records
from volunteer.net.records import ServerEntry, WrongKeyError
from volunteer.net.registry import ExpertRegistry


@pytest.fixture(scope="module")
def kp():
    return create_new_key_pair(b"k" * 32)


def pid_of(kp) -> str:
    return ID.from_pubkey(kp.public_key).to_base58()


def entry(pid: str, prefix: str = "g.0.", seq: int = 1) -> ServerEntry:
    return ServerEntry(experiment="exp", prefix=prefix, peer_id=pid, seq=seq,
                       expires=time.time() + 60.0, children=("1",), state="serving", load=0.0)


def test_entry_accepted_under_base_and_own_shard_key_only(kp):
    blob = records.sign_entry(entry(pid_of(kp)), kp.private_key)
    own = key_shards.writer_shard_key("exp", "g.0.", pid_of(kp))
    assert records.verify_entry(blob, key=records.dht_key("exp", "g.0."))
    assert records.verify_entry(blob, key=own)
    others = [k for k in key_shards.shard_keys("exp", "g.0.") if k != own]
    assert len(others) == key_shards.KEY_SHARDS - 1
    for key in [*others, key_shards.writer_shard_key("exp", "g.1.", pid_of(kp))]:
        with pytest.raises(WrongKeyError):
            records.verify_entry(blob, key=key)


def test_shard_keys_are_distinct_bounded_and_stable():
    keys = key_shards.shard_keys("exp", "g.0.")
    assert len(set(keys)) == key_shards.KEY_SHARDS
    assert records.dht_key("exp", "g.0.") not in keys
    assert all(len(k) == len(records.dht_key("exp", "g.0.")) for k in keys)
    assert key_shards.shard_of("12D3KooWabc") == key_shards.shard_of("12D3KooWabc")
    spread = {key_shards.shard_of(f"peer{i}") for i in range(200)}
    assert spread == set(range(key_shards.KEY_SHARDS))


def test_combine_reads_shards_only_when_the_base_is_full():
    cap = 8
    full_at = key_shards.is_full
    assert not full_at(5, cap) and full_at(6, cap) and full_at(8, cap)
    base_small = {f"b{i}": i for i in range(5)}
    shards = [{"s1": 1}, {"s2": 2, "b0": 99}]
    assert key_shards.combine(base_small, shards, cap) == base_small
    base_full = {f"b{i}": i for i in range(8)}
    got = key_shards.combine(base_full, shards, cap)
    assert set(got) == set(base_full) | {"s1", "s2"} and got["b0"] == 0
    fresher = key_shards.combine(base_full, shards, cap, fresher=lambda a, b: a > b)
    assert fresher["b0"] == 99
    assert key_shards.combine(base_full, [], cap) == base_full  # old layout: shards empty


def test_announce_writes_the_base_and_the_own_shard_key(kp, monkeypatch):
    keys: list[str] = []

    async def publish(dht, key, value):
        keys.append(key)
        return 1

    monkeypatch.setattr(dht_store, "publish_value", publish)
    dht = SimpleNamespace(host=SimpleNamespace(get_id=lambda: ID.from_pubkey(kp.public_key)))
    reg = ExpertRegistry(dht, kp, "exp")
    report = trio.run(lambda: reg.announce(["g.0.1", "g.2.3"]))
    want = set()
    for prefix in ("g.", "g.0.", "g.2."):
        want |= {records.dht_key("exp", prefix),
                 key_shards.writer_shard_key("exp", prefix, pid_of(kp))}
    assert sorted(keys) == sorted(want)
    assert report.keys == 3 and all(n == 2 for n in report.stored.values())


def _registry_over(monkeypatch, kp, held: dict[str, list[ServerEntry]], cap: int):
    reads: list[str] = []

    async def lookup_value(dht, key, *, policy=None, admit=None):
        reads.append(key)
        return {e.peer_id: (e, b"") for e in held.get(key, [])}

    monkeypatch.setattr(dht_store, "lookup_value", lookup_value)
    dht = SimpleNamespace(host=SimpleNamespace(get_id=lambda: ID.from_pubkey(kp.public_key)))
    return ExpertRegistry(dht, kp, "exp", policy=records.RecordPolicy(max_entries=cap)), reads


def test_lookup_of_a_full_prefix_lists_the_servers_the_base_key_refused(kp, monkeypatch):
    """The wall: a base key holds ``cap`` entries; the servers it refused are listed by their
    shard keys. The layout before key_shards returned the base key's ``cap`` servers only."""
    cap, n = 8, 40
    pids = [f"12D3KooWpeer{i:03d}" for i in range(n)]
    base = records.dht_key("exp", "g.0.")
    held: dict[str, list[ServerEntry]] = {base: [entry(p) for p in pids[:cap]]}
    for p in pids:
        held.setdefault(key_shards.writer_shard_key("exp", "g.0.", p), []).append(entry(p))
    reg, reads = _registry_over(monkeypatch, kp, held, cap)
    found = trio.run(reg.lookup, "g.0.")
    assert sorted(e.peer_id for e in found) == sorted(pids)
    assert reads[0] == base and sorted(reads[1:]) == sorted(key_shards.shard_keys("exp", "g.0."))
    reads.clear()  # a prefix seen full is read by its shard keys alone (one round)
    assert len(trio.run(reg.lookup, "g.0.")) == n
    assert sorted(reads) == sorted(key_shards.shard_keys("exp", "g.0."))


def test_a_prefix_that_shrank_is_read_by_its_base_key_again(kp, monkeypatch):
    cap = 8
    pids = [f"12D3KooWpeer{i:03d}" for i in range(40)]
    base = records.dht_key("exp", "g.0.")
    held: dict[str, list[ServerEntry]] = {base: [entry(p) for p in pids[:cap]]}
    for p in pids:
        held.setdefault(key_shards.writer_shard_key("exp", "g.0.", p), []).append(entry(p))
    reg, reads = _registry_over(monkeypatch, kp, held, cap)
    assert len(trio.run(reg.lookup, "g.0.")) == 40
    held.clear()
    held[base] = [entry(p) for p in pids[:3]]  # most servers left; the shards are empty
    for p in pids[:3]:
        held.setdefault(key_shards.writer_shard_key("exp", "g.0.", p), []).append(entry(p))
    reads.clear()
    assert sorted(e.peer_id for e in trio.run(reg.lookup, "g.0.")) == pids[:3]
    assert reads[-1] == base


def test_lookup_of_a_prefix_below_the_cap_reads_one_key(kp, monkeypatch):
    base = records.dht_key("exp", "g.0.")
    held = {base: [entry(f"12D3KooWp{i}") for i in range(3)]}
    reg, reads = _registry_over(monkeypatch, kp, held, 8)
    assert len(trio.run(reg.lookup, "g.0.")) == 3
    assert reads == [base]


def test_write_keys_follow_what_the_writers_last_read_of_the_base_key_showed():
    base, shard = "base", "shard"
    now = 1000.0
    assert key_shards.write_keys(base, shard, None, now) == (base, shard)  # never read: both
    assert key_shards.write_keys(base, shard, (False, True, now), now) == (base,)  # small swarm: as before
    assert key_shards.write_keys(base, shard, (True, True, now), now) == (base, shard)  # listed in a full key
    assert key_shards.write_keys(base, shard, (True, False, now), now) == (shard,)  # refused there: shard only
    stale = now - key_shards.WRITE_STATE_TTL_S - 1
    assert key_shards.write_keys(base, shard, (True, False, stale), now) == (base, shard)


def test_announce_after_a_read_writes_only_the_keys_that_list_this_node(kp, monkeypatch):
    """A prefix below the cap costs one write again; a full prefix whose base key refused this
    node costs its shard key alone (the base key takes the writes of the nodes it lists)."""
    me = pid_of(kp)
    cap = 8
    others = [f"12D3KooWpeer{i:03d}" for i in range(cap)]
    full, small = records.dht_key("exp", "g.0."), records.dht_key("exp", "g.2.")
    held = {full: [entry(p) for p in others], small: [entry(me, "g.2.")]}
    reg, _reads = _registry_over(monkeypatch, kp, held, cap)
    trio.run(reg.lookup, "g.0.")
    trio.run(reg.lookup, "g.2.")
    keys: list[str] = []

    async def publish(dht, key, value):
        keys.append(key)
        return 1

    monkeypatch.setattr(dht_store, "publish_value", publish)
    trio.run(lambda: reg.announce(["g.0.1", "g.2.3"]))
    root = records.dht_key("exp", "g.")
    assert sorted(keys) == sorted([
        root, key_shards.writer_shard_key("exp", "g.", me),  # never read here: both
        key_shards.writer_shard_key("exp", "g.0.", me),  # full, this node not listed: its shard only
        small,  # below the cap: the base key alone
    ])

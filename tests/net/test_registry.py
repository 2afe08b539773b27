"""Expert registry over a real KadDHT on loopback (3-4 libp2p nodes)."""

from __future__ import annotations

import time

import pytest
import trio

from tests.net.swarm_helpers import swarm, wait_for
from volunteer.net import dht_store, records
from volunteer.net.registry import ExpertRegistry


def reg(node, ttl=60.0, experiment="exp"):
    return ExpertRegistry(node.dht, node.key_pair, experiment, ttl=ttl)


@pytest.mark.timeout(90)
def test_announce_lookup_children_draining(tmp_path):
    async def main():
        async with swarm(tmp_path, 3, clients=1) as (a, b, c, trainer):
            ra, rb, rc, rt = reg(a), reg(b), reg(c), reg(trainer)
            rep = await ra.announce(["ffn.0.0", "ffn.0.1", "ffn.2.3"], load=1.0,
                                    addrs=a.multiaddrs(), zmq="tcp://127.0.0.1:5555",
                                    reachability="public")
            assert rep.ok and rep.keys == 3
            assert (await rb.announce(["ffn.1.1", "ffn.0.1"], load=0.5)).ok

            # Found by a third DHT server and by a client-mode node (holds no records).
            for reader in (rc, rt):
                kids = await reader.children(["ffn.", "ffn.0.", "ffn.1.", "ffn.2.", "ffn.3."])
                assert kids == {"ffn.": [0, 1, 2], "ffn.0.": [0, 1], "ffn.1.": [1],
                                "ffn.2.": [3], "ffn.3.": []}
                servers = {e.peer_id: e for e in await reader.servers("ffn.0.1")}
                assert set(servers) == {a.peer_id.to_base58(), b.peer_id.to_base58()}
                ea = servers[a.peer_id.to_base58()]
                assert (ea.zmq, ea.reachability, ea.load, ea.state) == \
                    ("tcp://127.0.0.1:5555", "public", 1.0, "serving")
                assert ea.addrs == tuple(a.multiaddrs())

            # Other experiments do not see these records.
            assert await reg(c, experiment="other").children(["ffn."]) == {"ffn.": []}

            # Draining: A re-announces with state draining; readers see it at once.
            await ra.announce(["ffn.0.0", "ffn.0.1", "ffn.2.3"], state="draining")
            kids = await rt.children(["ffn.", "ffn.0.", "ffn.2."])
            assert kids == {"ffn.": [0, 1], "ffn.0.": [1], "ffn.2.": []}
            states = {e.peer_id: e.state for e in await rt.servers("ffn.0.1")}
            assert states[a.peer_id.to_base58()] == "draining"

            # B stops serving ffn.1.1: the prefix is withdrawn.
            await rb.announce(["ffn.0.1"])
            await wait_for(lambda: _children(rt, "ffn.1."), timeout=10)

    trio.run(main)


async def _children(r, prefix):
    return (await r.children([prefix]))[prefix] == []


@pytest.mark.timeout(60)
def test_expired_records_disappear(tmp_path):
    async def main():
        async with swarm(tmp_path, 2) as (a, b):
            ra = reg(a, ttl=1.0)
            t0 = time.time()
            assert (await ra.announce(["ffn.7"])).ok
            rb = reg(b)
            kids = (await rb.children(["ffn."]))["ffn."]
            if time.time() - t0 < 1.0:  # still within its ttl on a slow machine
                assert kids == [7]
            await wait_for(lambda: _children(rb, "ffn."), timeout=10)

    trio.run(main)


@pytest.mark.timeout(60)
def test_forged_and_tampered_values_rejected(tmp_path):
    async def main():
        async with swarm(tmp_path, 3) as (a, b, c):
            key = records.dht_key("exp", "ffn.")
            kb = key.encode()
            ra = reg(a)
            good = ra.make_entry("ffn.", ["1"], state="serving", load=0, addrs=[], zmq=None,
                                 reachability="private")
            # Forged: claims to be C, signed by A. DHT servers refuse to store it.
            c_claim = records.ServerEntry("exp", "ffn.", c.peer_id.to_base58(), 1,
                                          time.time() + 60, ("9",), "serving", 0.0)
            forged = records.sign_entry(c_claim, a.key_pair.private_key)
            value = records.encode_value([forged])
            stored = await a.dht.value_store._store_at_peer(b.peer_id, kb, value)
            assert not stored
            assert b.dht.value_store.get(kb) is None
            with pytest.raises(records.ForgedRecordError):
                await dht_store.publish_value(a.dht, key, value)

            # A malicious DHT server (B) serves a value mixing a good, a forged and a
            # tampered entry, bypassing validation: readers keep only the good entry.
            tampered = bytearray(good)
            tampered[-70] ^= 0x01
            evil = records.encode_value([good, forged, bytes(tampered)])
            from libp2p.kad_dht.pb.kademlia_pb2 import Record
            rec = Record()
            rec.key, rec.value = kb, evil
            b.dht.value_store.store[kb] = (rec, time.time() + 60)
            found = await dht_store.lookup_value(c.dht, key)
            assert list(found) == [a.peer_id.to_base58()]
            assert found[a.peer_id.to_base58()][0].children == ("1",)

    trio.run(main)


@pytest.mark.timeout(60)
def test_dead_peers_are_dropped_and_do_not_block(tmp_path):
    async def main():
        async with swarm(tmp_path, 4) as (a, _b, c, d):
            await wait_for(lambda: a.dht.get_routing_table_size() >= 3)
            d.kill()
            await wait_for(lambda: d.peer_id not in a.host.get_connected_peers())
            ra = reg(a)
            assert (await ra.announce(["ffn.4.2"])).ok
            assert d.peer_id not in a.dht.routing_table.get_peer_ids()
            assert (await reg(c).children(["ffn.4."])) == {"ffn.4.": [2]}

    trio.run(main)


@pytest.mark.timeout(90)
def test_admission_and_withdrawal_hold_against_a_stranger(tmp_path):
    """A and B run an admitting experiment; C is a stranger with an open DHT that writes
    entries without a token and replays A's entry after A withdrew it."""
    def admit(e):
        return e.token == b"ticket"

    async def main():
        async with swarm(tmp_path, 3) as (a, b, c):
            stats = records.RecordStats()
            for node in (a, b):
                dht_store.configure_dht(node.dht, records.RecordPolicy(admit=admit, stats=stats))
            ra = ExpertRegistry(a.dht, a.key_pair, "exp", admission_token=b"ticket")
            rb = ExpertRegistry(b.dht, b.key_pair, "exp", admission_token=b"ticket")
            rc = reg(c)
            assert (await ra.announce(["ffn.1"])).ok
            assert (await rb.announce(["ffn.2"])).ok
            assert (await rc.announce(["ffn.1", "ffn.3"])).stored["ffn."] == 1  # only its own store
            key = records.dht_key("exp", "ffn.")
            assert b.dht.value_store.signer_keys(c.peer_id.to_base58()) == 0
            assert stats.get("not_admitted") >= 1

            assert await rb.children(["ffn."]) == {"ffn.": [1, 2]}  # C's entry dropped, counted
            holders = await rc.holders(["ffn.1", "ffn.3"], admit=admit)
            assert [e.peer_id for e in holders["ffn.1"]] == [a.peer_id.to_base58()]
            assert holders["ffn.3"] == []
            assert {e.peer_id for e in (await rc.holders(["ffn.1"]))["ffn.1"]} == {
                a.peer_id.to_base58(), c.peer_id.to_base58()}  # an open reader sees both

            old = next(blob for blob in records.decode_value(a.dht.value_store.get(key.encode()).value)
                       if records.verify_entry(blob).peer_id == a.peer_id.to_base58())
            await ra.announce([])  # A withdraws
            assert [e.peer_id for e in await rb.servers("ffn.1")] == []
            stored = await dht_store.publish_value(c.dht, key, records.encode_value([old]))
            assert stored == 0  # every DHT server holds A's tombstone: the replay is refused
            assert [e.peer_id for e in await rc.servers("ffn.1", admit=admit)] == []

    trio.run(main)

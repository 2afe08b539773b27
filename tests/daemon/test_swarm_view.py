"""``SwarmView``: the DHT's signed entries in the shapes the assignment and downloads need."""

from __future__ import annotations

import hashlib
import time

from volunteer.daemon.swarm_view import ShardOffer, SwarmView
from volunteer.experts.assignment import Holder, PeerSlots
from volunteer.net.records import ServerEntry, ShardInfo
from volunteer.net.shard_download import Source

ME = "peer-me"
RA = hashlib.sha256(b"a").digest()
RB = hashlib.sha256(b"b").digest()
RC = hashlib.sha256(b"c").digest()


def e(peer: str, *, prefix: str = "g.0.", children=("1",), seq: int = 1, state: str = "serving",
      load: float = 0.0, free: int = 0, shards: dict[str, tuple[int, bytes]] | None = None) -> ServerEntry:
    return ServerEntry(experiment="exp", prefix=prefix, peer_id=peer, seq=seq, expires=time.time() + 60.0,
                       children=tuple(children), state=state, load=load, addrs=(f"/dns/{peer}/tcp/1",),
                       shards=tuple(ShardInfo(c, v, r) for c, (v, r) in (shards or {}).items()), free=free)


def by_peer(holders: list[Holder]) -> dict[str, Holder]:
    out = {h.peer_id: h for h in holders}
    assert len(out) == len(holders), "a peer listed twice"
    return out


def test_holders_exclude_me_dedup_by_peer_and_carry_versions():
    view = SwarmView({
        "g.0.1": [
            e(ME, shards={"1": (9, RA)}),
            e("p1", seq=1, load=0.9, shards={"1": (3, RA)}),
            e("p1", seq=5, load=0.2, shards={"1": (7, RB)}),  # fresher: wins
            e("p1", seq=2, load=0.5, shards={"1": (4, RC)}),
            e("p2", state="draining", load=0.1),  # no shard announced: version 0
        ],
        "g.0.2": [],
    }, ME)
    holders = view.holders()
    assert set(holders) == {"g.0.1", "g.0.2"} and holders["g.0.2"] == []
    assert by_peer(holders["g.0.1"]) == {
        "p1": Holder("p1", 0.2, 7, "serving"),
        "p2": Holder("p2", 0.1, 0, "draining"),
    }


def test_holders_read_the_shard_of_the_uid_child_only():
    # one entry under g.0. lists children 1 and 2 with different shards
    entry = e("p1", children=("1", "2"), shards={"1": (3, RA), "2": (8, RB)})
    view = SwarmView({"g.0.1": [entry], "g.0.2": [entry]}, ME)
    h = view.holders()
    assert h["g.0.1"][0].version == 3 and h["g.0.2"][0].version == 8
    assert view.replicas("g.0.2") == {"p1": 8}
    assert view.newest("g.0.2") == ShardOffer(8, RB, (Source("p1", ("/dns/p1/tcp/1",)),))


def test_peers_gives_free_and_load_of_serving_peers_only():
    view = SwarmView({
        "g.0.1": [e(ME, free=9), e("p1", seq=1, free=1, load=0.7), e("p2", state="draining", free=5),
                  e("p3", seq=3, free=2, load=0.3)],
        "g.0.2": [e("p1", seq=4, children=("2",), free=3, load=0.4),  # p1's freshest entry
                  e("p3", seq=9, state="draining", free=2)],  # p3 is leaving now
    }, ME)
    assert view.peers() == {"p1": PeerSlots(free=3, load=0.4)}


def test_newest_picks_highest_version_and_lists_all_its_sources():
    view = SwarmView({"g.0.1": [
        e(ME, shards={"1": (99, RC)}),  # mine is never a source
        e("p1", shards={"1": (5, RA)}),
        e("p2", shards={"1": (7, RB)}),
        e("p3", state="draining", shards={"1": (7, RB)}),  # a leaving holder still serves chunks
        e("p4", shards={"1": (6, RC)}),
        e("p5"),  # serves the uid without announcing a shard
    ]}, ME)
    offer = view.newest("g.0.1")
    assert offer is not None and (offer.version, offer.root) == (7, RB)
    assert {s.peer_id for s in offer.sources} == {"p2", "p3"}
    assert all(s.addrs == (f"/dns/{s.peer_id}/tcp/1",) for s in offer.sources)
    # excluding a holder keeps the others of that root
    assert {s.peer_id for s in view.newest("g.0.1", exclude=["p2"]).sources} == {"p3"}
    # excluding both holders of the newest root falls back to the next version
    fallback = view.newest("g.0.1", exclude=["p2", "p3"])
    assert (fallback.version, fallback.root, [s.peer_id for s in fallback.sources]) == (6, RC, ["p4"])


def test_newest_tie_on_version_prefers_most_holders():
    view = SwarmView({"g.0.1": [
        e("p1", shards={"1": (5, RA)}),
        e("p2", shards={"1": (5, RB)}),
        e("p3", shards={"1": (5, RB)}),
    ]}, ME)
    offer = view.newest("g.0.1")
    assert offer.root == RB and {s.peer_id for s in offer.sources} == {"p2", "p3"}
    flipped = SwarmView({"g.0.1": [
        e("p2", shards={"1": (5, RB)}),
        e("p1", shards={"1": (5, RA)}),
        e("p3", shards={"1": (5, RA)}),
    ]}, ME)
    assert flipped.newest("g.0.1").root == RA


def test_newest_none_without_shards():
    view = SwarmView({"g.0.1": [e("p1"), e(ME, shards={"1": (1, RA)})], "g.0.2": []}, ME)
    assert view.newest("g.0.1") is None
    assert view.newest("g.0.2") is None
    assert view.newest("g.0.3") is None  # not in the view at all


def test_sources_and_replicas():
    view = SwarmView({"g.0.1": [
        e(ME, shards={"1": (4, RA)}),
        e("p1", shards={"1": (4, RA)}),
        e("p2", state="draining", shards={"1": (4, RA)}),
        e("p3", shards={"1": (2, RB)}),
        e("p4"),
        e("p1", seq=0, shards={"1": (1, RC)}),  # stale entry of p1: ignored
    ]}, ME)
    assert sorted(s.peer_id for s in view.sources("g.0.1", RA)) == ["p1", "p2"]
    assert [s.peer_id for s in view.sources("g.0.1", RB)] == ["p3"]
    assert view.sources("g.0.1", RC) == ()
    assert view.replicas("g.0.1") == {"p1": 4, "p3": 2, "p4": 0}  # serving only, me excluded
    assert view.replicas("g.0.9") == {}
    assert view.addrs("p3") == ("/dns/p3/tcp/1",) and view.addrs("nobody") == ()

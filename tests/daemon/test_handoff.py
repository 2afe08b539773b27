"""``hand_off`` at leave, against a fake shard manager: held, adopted, refused, local only."""

from __future__ import annotations

import hashlib
import threading
import time
from types import SimpleNamespace

import pytest

from volunteer.daemon.handoff import hand_off
from volunteer.daemon.swarm_view import SwarmView
from volunteer.net.records import ServerEntry, ShardInfo
from volunteer.net.shard_rpc import ShardRequestError

ME = "peer-me"
pytestmark = pytest.mark.timeout(60)


def root(uid: str, version: int) -> bytes:
    return hashlib.sha256(f"{uid}@{version}".encode()).digest()


def e(peer: str, uid: str, *, state: str = "serving", load: float = 0.0, free: int = 1, seq: int = 1,
      shard: tuple[int, bytes] | None = None) -> ServerEntry:
    prefix, child = uid.rsplit(".", 1)
    return ServerEntry(experiment="exp", prefix=prefix + ".", peer_id=peer, seq=seq, expires=time.time() + 60,
                       children=(child,), state=state, load=load, addrs=(f"/dns/{peer}/tcp/1",),
                       shards=(ShardInfo(child, *shard),) if shard else (), free=free)


class FakeShards:
    """``ShardNetwork.offer``: records every offer; peers in ``refuse`` raise like a refusing adopter."""

    def __init__(self, refuse: set[str] | None = None) -> None:
        self.refuse = refuse or set()
        self.offers: list[tuple] = []
        self._lock = threading.Lock()

    def offer(self, peer, addrs, uid, version, root, timeout):
        with self._lock:
            self.offers.append((peer, tuple(addrs), uid, version, root, timeout))
        if peer in self.refuse:
            raise ShardRequestError("refused", "no free slot")
        return f"{peer} serves {uid} v{version}"

    def offered(self, uid: str) -> list[str]:
        return [o[0] for o in self.offers if o[2] == uid]


class FakeManager:
    def __init__(self, hosted: dict[str, int], entries: dict[str, list[ServerEntry]] | None,
                 refuse: set[str] | None = None) -> None:
        self.hosted = list(hosted)
        self.snapshots = {u: (v, root(u, v)) for u, v in hosted.items()}
        self.events: list[str] = []
        self.entries = entries
        self.shards = FakeShards(refuse)
        self.network = None if entries is None else SimpleNamespace(shards=self.shards)

    def snapshot(self, force: bool = False):
        self.events.append("snapshot")
        return list(self.hosted)

    def announce(self, state: str = "serving"):
        self.events.append(f"announce:{state}")

    def read_view(self) -> SwarmView:
        self.events.append("read_view")
        return SwarmView(self.entries, ME)

    def _me(self) -> str:
        return ME


def deadline(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


def test_uid_held_at_the_same_root_needs_nothing():
    m = FakeManager({"g.0.1": 5, "g.0.2": 3}, {})
    m.entries = {
        "g.0.1": [e(ME, "g.0.1", shard=(5, root("g.0.1", 5))), e("p1", "g.0.1", shard=(5, root("g.0.1", 5)))],
        "g.0.2": [e("p2", "g.0.2", shard=(2, root("g.0.2", 2)))],  # an older version: not the same weights
    }
    out = {h.uid: h for h in hand_off(m, deadline())}
    assert m.events == ["snapshot", "announce:draining", "read_view"]
    assert out["g.0.1"].outcome == "held" and out["g.0.1"].peer == "p1"
    assert out["g.0.1"].version == 5 and out["g.0.1"].root == root("g.0.1", 5).hex()[:16]
    assert "already serves" in out["g.0.1"].line()
    assert m.shards.offered("g.0.1") == []
    # p2 already serves g.0.2 (older), p1 does not: p1 is asked to adopt it
    assert out["g.0.2"].outcome == "adopted" and out["g.0.2"].peer == "p1"
    assert m.shards.offered("g.0.2") == ["p1"]


def test_draining_holder_at_the_same_root_does_not_count():
    r = root("g.0.1", 5)
    m = FakeManager({"g.0.1": 5}, {"g.0.1": [e("p1", "g.0.1", state="draining", shard=(5, r))],
                                   "g.0.2": [e("p2", "g.0.2", free=2)]})
    (h,) = hand_off(m, deadline())
    assert h.outcome == "adopted" and h.peer == "p2"


def test_offer_goes_to_the_chosen_adopter():
    m = FakeManager({"g.0.1": 4}, {"g.0.2": [e("p1", "g.0.2", load=0.6, free=3),
                                             e("p2", "g.0.2", load=0.1, free=1)]})
    t0 = time.monotonic()
    (h,) = hand_off(m, t0 + 30.0)
    assert h.outcome == "adopted" and h.peer == "p2"  # least loaded with a free slot
    assert h.detail == "p2 serves g.0.1 v4" and h.seconds >= 0
    assert h.version == 4 and h.root == root("g.0.1", 4).hex()[:16]
    assert "handed off g.0.1 v4 to p2" in h.line()
    ((peer, addrs, uid, version, rt, timeout),) = m.shards.offers
    assert (peer, addrs, uid, version, rt) == ("p2", ("/dns/p2/tcp/1",), "g.0.1", 4, root("g.0.1", 4))
    assert 1.0 <= timeout <= 30.0


def test_refusing_adopter_moves_on_to_the_next_peer():
    entries = {"g.0.2": [e("p1", "g.0.2", load=0.1), e("p2", "g.0.2", load=0.5)]}
    m = FakeManager({"g.0.1": 1}, entries, refuse={"p1"})
    (h,) = hand_off(m, deadline())
    assert m.shards.offered("g.0.1") == ["p1", "p2"]
    assert h.outcome == "adopted" and h.peer == "p2"


def test_every_adopter_refusing_leaves_it_local_with_the_reason():
    entries = {"g.0.2": [e("p1", "g.0.2"), e("p2", "g.0.2")]}
    m = FakeManager({"g.0.1": 1}, entries, refuse={"p1", "p2"})
    (h,) = hand_off(m, deadline())
    assert sorted(m.shards.offered("g.0.1")) == ["p1", "p2"]  # each asked once
    assert h.outcome == "local_only" and h.peer is None
    assert "did not take it" in h.detail and "refused" in h.detail
    assert "stayed only in the local checkpoint" in h.line()


def test_no_other_peer_leaves_it_local():
    entries = {"g.0.1": [e(ME, "g.0.1")],
               "g.0.2": [e("p1", "g.0.2", state="draining")]}  # a leaving peer adopts nothing
    m = FakeManager({"g.0.1": 2}, entries)
    (h,) = hand_off(m, deadline())
    assert h.outcome == "local_only" and h.detail == "no other serving volunteer in the swarm"
    assert m.shards.offers == []


def test_without_a_network_everything_stays_local():
    m = FakeManager({"g.0.1": 2, "g.0.2": 0}, None)
    out = hand_off(m, deadline())
    assert [(h.uid, h.outcome) for h in out] == [("g.0.1", "local_only"), ("g.0.2", "local_only")]
    assert all(h.detail == "the peer network is disabled" for h in out)
    assert out[0].version == 2 and out[0].root == root("g.0.1", 2).hex()[:16]
    assert m.events == []  # no snapshot, announce or DHT read


def test_no_time_left_is_said_so():
    m = FakeManager({"g.0.1": 1}, {"g.0.2": [e("p1", "g.0.2")]})
    (h,) = hand_off(m, time.monotonic() + 0.5)
    assert h.outcome == "local_only" and "deadline" in h.detail
    assert m.shards.offers == []


def test_offers_spread_over_peers_by_free_slots():
    entries = {"g.1.0": [e("p1", "g.1.0", free=1), e("p2", "g.1.0", free=1), e("p3", "g.1.0", free=1)]}
    hosted = {"g.0.1": 1, "g.0.2": 1, "g.0.3": 1}
    m = FakeManager(hosted, entries)
    out = hand_off(m, deadline())
    assert [h.uid for h in out] == list(hosted)  # one result per hosted uid, in order
    assert all(h.outcome == "adopted" for h in out)
    assert sorted(h.peer for h in out) == ["p1", "p2", "p3"]  # each free slot taken once
    assert len(m.shards.offers) == 3


def test_more_uids_than_free_slots_still_all_offered():
    entries = {"g.1.0": [e("p1", "g.1.0", free=1, load=0.2), e("p2", "g.1.0", free=0, load=0.0)]}
    hosted = {"g.0.1": 1, "g.0.2": 1}
    m = FakeManager(hosted, entries)
    out = hand_off(m, deadline())
    assert all(h.outcome == "adopted" for h in out)
    # p1's single slot goes to one uid; the other goes to the least loaded peer without room
    assert sorted(h.peer for h in out) == ["p1", "p2"]

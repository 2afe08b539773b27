"""DhtDirectory's choices (server selection, transport kind, caching, measured outcomes,
admission) without a network."""

from __future__ import annotations

import random
import time

import pytest

from volunteer.client.dht_directory import DhtDirectory, FallbackTransport, best_server
from volunteer.client.server_choice import MeasuredTransport, ServerScores
from volunteer.client.zmq_transport import ZmqTransport
from volunteer.net.records import RecordStats, ServerEntry
from volunteer.wire.errors import RemoteTimeoutError, UnreachableError


def entry(peer, children, *, load=0.0, state="serving", reach="private", zmq="tcp://127.0.0.1:9"):
    return ServerEntry("exp", "ffn.1.", peer, 1, time.time() + 60, tuple(children), state, load,
                       ("/ip4/127.0.0.1/tcp/1/p2p/" + peer,), zmq, reach)


class FakeClient:
    """Stands in for ClientNode: canned lookups, records what was asked."""

    def __init__(self, entries):
        self.entries = entries
        self.asked = []

    def lookup(self, prefixes):
        self.asked.append(list(prefixes))
        return {p: self.entries.get(p, []) for p in prefixes}

    def transport(self, peer_id, addrs):
        return ("libp2p", peer_id, tuple(addrs))


def test_best_server_serving_only_load_a_capped_preference():
    es = [entry("A", ["1"], load=0.5), entry("B", ["1"], load=0.1, state="draining"),
          entry("C", ["1", "2"], load=0.2), entry("D", ["2"], load=0.0)]
    picks = [best_server(es, "1", random.Random(i)).peer_id for i in range(300)]
    assert set(picks) == {"A", "C"}  # never the draining one; the higher load is not excluded
    assert picks.count("C") > picks.count("A")  # but the lower load is preferred
    assert {best_server(es, "2", random.Random(i)).peer_id for i in range(50)} == {"C", "D"}
    assert best_server(es, "3") is None
    ties = [entry("A", ["1"]), entry("B", ["1"])]
    assert {best_server(ties, "1", random.Random(i)).peer_id for i in range(20)} == {"A", "B"}


def test_resolve_prefers_zmq_for_public_and_caches():
    client = FakeClient({
        "ffn.1.": [entry("PUB", ["1"], load=0.0, reach="public"), entry("PRIV", ["2"], reach="private")],
        "ffn.": [entry("PUB", ["1"]), entry("X", ["3"], state="draining")],
    })
    d = DhtDirectory(client, cache_ttl=60.0)
    out = d.resolve(["ffn.1.1", "ffn.1.2", "ffn.1.3", "bad..uid"])
    assert set(out) == {"ffn.1.1", "ffn.1.2"}
    assert all(isinstance(t, MeasuredTransport) for t in out.values())
    assert isinstance(out["ffn.1.1"].inner, FallbackTransport)
    assert isinstance(out["ffn.1.1"].inner.primary, ZmqTransport)
    assert out["ffn.1.2"].inner[0] == "libp2p" and out["ffn.1.2"].peer_id == "PRIV"
    assert d.children(["ffn.", "ffn.1."]) == {"ffn.": [1], "ffn.1.": [1, 2]}
    assert client.asked == [["ffn.1."], ["ffn."]]  # ffn.1. came from the cache
    assert d.resolve(["ffn.1.1"])["ffn.1.1"] is out["ffn.1.1"]  # transports reused
    d.invalidate()
    d.children(["ffn.1."])
    assert client.asked[-1] == ["ffn.1."]
    d.close()


def test_invalidate_uids_drops_only_the_lookups_that_offer_them():
    client = FakeClient({
        "demo.ffn.": [entry("A", ["1", "2"])],
        "demo.ffn.1.": [entry("A", ["0"])],
        "demo.ffn.2.": [entry("B", ["0"])],
    })
    d = DhtDirectory(client, cache_ttl=60.0)
    assert d.children(["demo.ffn.", "demo.ffn.1.", "demo.ffn.2."]) == {
        "demo.ffn.": [1, 2], "demo.ffn.1.": [0], "demo.ffn.2.": [0]}
    # A leaves: its records now say draining, but the cache would offer it for 60 s
    client.entries["demo.ffn."] = [entry("A", ["1", "2"], state="draining"), entry("B", ["2"])]
    client.entries["demo.ffn.1."] = [entry("A", ["0"], state="draining")]
    assert d.children(["demo.ffn.1."]) == {"demo.ffn.1.": [0]}  # stale, from the cache
    d.invalidate(["demo.ffn.1.0", "other.9"])
    assert d.children(["demo.ffn.", "demo.ffn.1.", "demo.ffn.2."]) == {
        "demo.ffn.": [2], "demo.ffn.1.": [], "demo.ffn.2.": [0]}
    assert client.asked[-1] == ["demo.ffn.", "demo.ffn.1."]  # demo.ffn.2. stayed cached
    assert "demo.ffn.1.0" not in d.resolve(["demo.ffn.1.0"])
    d.invalidate([])  # nothing to forget
    d.children(["demo.ffn.2."])
    assert client.asked[-1] == ["demo.ffn.", "demo.ffn.1."]
    d.close()


class Canned:
    def __init__(self, result=None, error=None):
        self.result, self.error, self.calls, self.closed = result, error, 0, False

    def request(self, frames, timeout):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.result

    def close(self):
        self.closed = True


def test_fallback_transport_switches_on_unreachable_only():
    import pytest

    from volunteer.wire.errors import RemoteTimeoutError, UnreachableError
    zmq, p2p = Canned(error=UnreachableError("no route")), Canned(result=[b"ok"])
    t = FallbackTransport(zmq, p2p)
    assert t.request([b"x"], 1.0) == [b"ok"] and t.failed_over
    assert t.request([b"x"], 1.0) == [b"ok"] and zmq.calls == 1 and p2p.calls == 2
    slow = FallbackTransport(Canned(error=RemoteTimeoutError("slow")), Canned(result=[b"ok"]))
    with pytest.raises(RemoteTimeoutError):
        slow.request([b"x"], 1.0)
    assert not slow.failed_over
    t.close()
    assert zmq.closed and p2p.closed


class Slow(Canned):
    """A transport whose request takes ``cost`` seconds on a fake clock."""

    def __init__(self, clock, cost, **kw):
        super().__init__(**kw)
        self.clock, self.cost, self.timeouts = clock, cost, []

    def request(self, frames, timeout):
        self.timeouts.append(timeout)
        self.clock.t += self.cost
        return super().request(frames, timeout)


def test_fallback_gets_only_the_time_left_and_the_primary_is_retried_later():
    import pytest

    from volunteer.wire.errors import RemoteTimeoutError, UnreachableError
    clock = FakeClock()
    zmq = Slow(clock, 0.75, error=UnreachableError("reset"))
    p2p = Slow(clock, 0.0, result=[b"ok"])
    t = FallbackTransport(zmq, p2p, clock=clock)
    assert t.request([b"x"], 2.0) == [b"ok"]
    assert p2p.timeouts == [1.25]  # 2.0 s deadline minus the 0.75 s ZeroMQ spent
    assert t.request([b"x"], 2.0) == [b"ok"] and zmq.calls == 1  # no retry yet
    clock.t += t.retry_primary_s
    zmq.error, zmq.result = None, [b"zmq"]
    assert t.request([b"x"], 2.0) == [b"zmq"] and not t.failed_over  # back on ZeroMQ
    stuck = FallbackTransport(Slow(clock, 3.0, error=UnreachableError("slow reset")), p2p, clock=clock)
    with pytest.raises(RemoteTimeoutError):
        stuck.request([b"x"], 2.0)  # nothing left for the fallback: a typed timeout, in time


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Server:
    """A fake transport whose requests take ``latency`` seconds of a fake clock, or fail."""

    def __init__(self, clock, latency, error=None):
        self.clock, self.latency, self.error, self.calls = clock, latency, error, 0

    def request(self, frames, timeout):
        self.calls += 1
        self.clock.t += min(self.latency, timeout)
        if self.error is not None:
            raise self.error
        return [b"reply", b"tensor"]

    def close(self):
        pass


class ServingClient(FakeClient):
    def __init__(self, entries, servers):
        super().__init__(entries)
        self.servers = servers

    def transport(self, peer_id, addrs):
        return self.servers[peer_id]


def test_directory_measures_every_request_and_a_slow_liar_loses():
    clock = FakeClock()
    servers = {"LIAR": Server(clock, 2.0), "HONEST": Server(clock, 0.05)}
    client = ServingClient({"ffn.1.": [entry("LIAR", ["1"], load=0.0), entry("HONEST", ["1"], load=0.9)]},
                           servers)
    d = DhtDirectory(client, cache_ttl=1e9, scores=ServerScores(clock=clock), rng=random.Random(0))
    for _ in range(40):
        d.resolve(["ffn.1.1"])["ffn.1.1"].request([b"x"], 5.0)
    assert servers["LIAR"].calls >= 1 and servers["HONEST"].calls >= 1
    assert servers["LIAR"].calls + servers["HONEST"].calls == 40  # every request measured
    liar, honest = d.scores.measure("LIAR"), d.scores.measure("HONEST")
    assert liar.latency == pytest.approx(2.0) and honest.latency == pytest.approx(0.05)
    assert liar.successes > 0 and honest.successes > 0 and liar.errors == honest.errors == 0
    picks = {d.resolve(["ffn.1.1"])["ffn.1.1"].peer_id for _ in range(50)}
    assert picks == {"HONEST"}  # claiming load 0 does not outweigh a 40x slower reply
    d.close()


def test_directory_counts_errors_and_timeouts_and_moves_away():
    clock = FakeClock()
    servers = {"FLAKY": Server(clock, 0.01, error=UnreachableError("gone")),
               "STUCK": Server(clock, 5.0, error=RemoteTimeoutError("slow")),
               "OK": Server(clock, 0.05)}
    es = [entry(p, ["1"], load=0.5) for p in servers]
    d = DhtDirectory(ServingClient({"ffn.1.": es}, servers), cache_ttl=1e9,
                     scores=ServerScores(clock=clock), rng=random.Random(1))
    for p in ("FLAKY", "STUCK"):
        t = d.transport_for(next(e for e in es if e.peer_id == p))
        for _ in range(3):
            with pytest.raises((UnreachableError, RemoteTimeoutError)):
                t.request([b"x"], 2.0)
    assert d.scores.measure("FLAKY").errors == pytest.approx(3, rel=0.1)
    stuck = d.scores.measure("STUCK")
    assert stuck.timeouts == pytest.approx(3, rel=0.1) and stuck.latency == pytest.approx(2.0)
    picks = {d.resolve(["ffn.1.1"])["ffn.1.1"].peer_id for _ in range(50)}
    assert picks == {"OK"}
    d.close()


def test_directory_admit_filter_drops_and_counts():
    client = FakeClient({"ffn.1.": [entry("IN", ["1"]), entry("OUT", ["1", "2"])]})
    stats = RecordStats()

    def admit(e):
        if e.peer_id == "BOOM":
            raise ValueError("hostile token")
        return e.peer_id == "IN"

    d = DhtDirectory(client, cache_ttl=60.0, admit=admit, stats=stats)
    assert d.children(["ffn.1."]) == {"ffn.1.": [1]}
    assert {d.resolve(["ffn.1.1"])["ffn.1.1"].peer_id for _ in range(10)} == {"IN"}
    assert "ffn.1.2" not in d.resolve(["ffn.1.2"])
    assert stats.as_dict() == {"not_admitted": 1}  # counted once per lookup, not per read
    client.entries["ffn.1."].append(entry("BOOM", ["3"]))
    d.invalidate()
    assert d.children(["ffn.1."]) == {"ffn.1.": [1]} and stats.get("not_admitted") == 3
    open_dir = DhtDirectory(client, cache_ttl=60.0)
    assert open_dir.children(["ffn.1."]) == {"ffn.1.": [1, 2, 3]}  # no filter: unchanged


def test_an_empty_lookup_is_cached_only_briefly(monkeypatch):
    from volunteer.client import dht_directory

    now = [100.0]
    monkeypatch.setattr(dht_directory.time, "monotonic", lambda: now[0])
    client = FakeClient({"ffn.": [entry("A", ["1"])]})
    d = DhtDirectory(client, cache_ttl=60.0)
    assert d.children(["ffn.", "ffn.1."]) == {"ffn.": [1], "ffn.1.": []}
    now[0] += dht_directory.EMPTY_CACHE_TTL / 2
    d.children(["ffn.", "ffn.1."])
    assert client.asked == [["ffn.", "ffn.1."]]  # both from the cache, briefly
    now[0] += dht_directory.EMPTY_CACHE_TTL
    client.entries["ffn.1."] = [entry("A", ["0"])]  # the server's first announce landed
    assert d.children(["ffn.", "ffn.1."]) == {"ffn.": [1], "ffn.1.": [0]}
    assert client.asked[-1] == ["ffn.1."]  # the empty answer was asked again, the full one not
    d.close()

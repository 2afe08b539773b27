"""DhtDirectory's choices (server selection, transport kind, caching) without a network."""

from __future__ import annotations

import random
import time

from volunteer.client.zmq_transport import ZmqTransport
from volunteer.net.dht_directory import DhtDirectory, FallbackTransport, best_server
from volunteer.net.records import ServerEntry


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


def test_best_server_lowest_load_serving_only():
    es = [entry("A", ["1"], load=0.5), entry("B", ["1"], load=0.1, state="draining"),
          entry("C", ["1", "2"], load=0.2), entry("D", ["2"], load=0.0)]
    assert best_server(es, "1").peer_id == "C"
    assert best_server(es, "2").peer_id == "D"
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
    assert isinstance(out["ffn.1.1"], FallbackTransport)
    assert isinstance(out["ffn.1.1"].primary, ZmqTransport)
    assert out["ffn.1.2"][0] == "libp2p"
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

"""Server choice: client measurements beat a server's word about its own load (fake clock)."""

from __future__ import annotations

import random
import threading
import time

import msgpack
import pytest

from volunteer.client.server_choice import (
    LOAD_WEIGHT,
    MeasuredTransport,
    ServerScores,
    error_reply_code,
)
from volunteer.net.records import ServerEntry
from volunteer.wire.errors import RemoteTimeoutError, UnreachableError


class FakeClock:
    def __init__(self):
        self.t = 500.0

    def __call__(self):
        return self.t


def entry(peer, load):
    return ServerEntry("exp", "ffn.", peer, 1, time.time() + 60, ("1",), "serving", load)


def warm(scores, peer, latency, n=10):
    for _ in range(n):
        scores.record_success(peer, latency)


def test_a_liar_claiming_load_zero_with_bad_latency_loses_to_an_honest_server():
    scores = ServerScores(clock=FakeClock())
    warm(scores, "liar", 0.5)
    warm(scores, "honest", 0.05)
    prior = scores.prior(["liar", "honest"])
    assert scores.score("liar", 0.0, prior) > scores.score("honest", 0.9, prior)
    cands = [entry("liar", 0.0), entry("honest", 0.9)]
    assert {scores.choose(cands, random.Random(i)).peer_id for i in range(200)} == {"honest"}


def test_self_reported_load_gains_a_bounded_advantage_only():
    scores = ServerScores(clock=FakeClock())
    warm(scores, "liar", 0.05)
    warm(scores, "honest", 0.05)
    ratio = scores.score("honest", 1.0) / scores.score("liar", 0.0)
    assert ratio == pytest.approx(1 + LOAD_WEIGHT)
    # out-of-range or non-finite claims are clamped, never a bigger advantage
    for claim in (-100.0, float("-inf"), float("nan")):
        assert scores.score("liar", claim) >= scores.score("liar", 0.0)
    cands = [entry("liar", 0.0), entry("honest", 1.0)]
    picks = [scores.choose(cands, random.Random(i)).peer_id for i in range(400)]
    assert picks.count("honest") > 100  # the liar does not draw all the traffic
    assert picks.count("liar") > picks.count("honest")  # the load is still a preference


def test_equal_servers_share_and_unmeasured_ones_are_tried():
    scores = ServerScores(clock=FakeClock())
    cands = [entry(p, 0.3) for p in "ABC"]
    assert {scores.choose(cands, random.Random(i)).peer_id for i in range(60)} == set("ABC")
    warm(scores, "A", 0.2)
    warm(scores, "B", 0.4)
    assert scores.prior(["A", "B", "C"]) == pytest.approx(0.3)  # C gets the median
    assert scores.choose([], random.Random(0)) is None


def test_failures_and_timeouts_raise_the_cost():
    scores = ServerScores(clock=FakeClock())
    for p in ("ok", "flaky", "stuck"):
        warm(scores, p, 0.05)
    for _ in range(10):
        scores.record_error("flaky")
        scores.record_timeout("stuck", 3.0)
    base = scores.score("ok", 0.0)
    assert scores.score("flaky", 0.0) > 2 * base
    assert scores.score("stuck", 0.0) > 10 * base  # its timeouts counted their elapsed time
    cands = [entry("ok", 1.0), entry("flaky", 0.0), entry("stuck", 0.0)]
    assert {scores.choose(cands, random.Random(i)).peer_id for i in range(100)} == {"ok"}


def test_measurements_fade_so_a_slow_server_is_tried_again():
    clock = FakeClock()
    scores = ServerScores(clock=clock, half_life=10.0)
    warm(scores, "slow", 1.0)
    warm(scores, "fast", 0.05)
    for _ in range(5):
        scores.record_error("slow")
    cands = [entry("slow", 0.0), entry("fast", 0.0)]
    assert {scores.choose(cands, random.Random(i)).peer_id for i in range(50)} == {"fast"}
    clock.t += 200.0  # 20 half-lives
    m = scores.measure("slow")
    assert m.errors < 0.01 and m.successes < 0.01
    prior = scores.prior(["slow", "fast"])
    assert scores.score("slow", 0.0, prior) == pytest.approx(prior, rel=0.01)
    assert "slow" in {scores.choose(cands, random.Random(i)).peer_id for i in range(50)}


def test_tracked_servers_are_bounded_and_threads_do_not_lose_counts():
    scores = ServerScores(clock=FakeClock(), max_tracked=8)
    for i in range(100):
        scores.record_success(f"p{i}", 0.01)
    assert len(scores.snapshot()) == 8 and "p99" in scores.snapshot()

    shared = ServerScores(clock=FakeClock())
    threads = [threading.Thread(target=warm, args=(shared, "x", 0.01, 500)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert shared.measure("x").successes == pytest.approx(2000)


class Canned:
    def __init__(self, clock, reply=None, error=None, took=0.1):
        self.clock, self.reply, self.error, self.took, self.closed = clock, reply, error, took, False

    def request(self, frames, timeout):
        self.clock.t += self.took
        if self.error is not None:
            raise self.error
        return self.reply

    def close(self):
        self.closed = True


def err(code):
    return [msgpack.packb({"v": 1, "op": "error", "id": 1, "code": code, "msg": "x"})]


@pytest.mark.parametrize("reply,kind", [
    ([b"hdr", b"tensor"], "success"),
    ([msgpack.packb({"v": 1, "op": "result", "id": 1, "t": []})], "success"),
    (err("bad_request"), "success"),  # the client's fault, not the server's
    (err("cache_miss"), "success"),
    (err("overloaded"), "error"),
    (err("internal"), "error"),
    (err("draining"), "error"),
    ([b"\xc1garbage"], "error"),
    ([msgpack.packb([1, 2])], "error"),
    ([msgpack.packb({"op": "error", "code": 7})], "error"),
    ([b"\x00" * 10_000], "success"),  # too large to peek at: not judged here
])
def test_measured_transport_judges_replies(reply, kind):
    clock = FakeClock()
    scores = ServerScores(clock=clock)
    t = MeasuredTransport(Canned(clock, reply=reply, took=0.25), "p", scores)
    assert t.request([b"x"], 1.0) is reply
    m = scores.measure("p")
    if kind == "success":
        assert m.successes == 1 and m.errors == 0 and m.latency == pytest.approx(0.25)
    else:
        assert m.errors == 1 and m.successes == 0 and m.latency is None


def test_measured_transport_records_failures_and_reraises():
    clock = FakeClock()
    scores = ServerScores(clock=clock)
    slow = MeasuredTransport(Canned(clock, error=RemoteTimeoutError("t"), took=2.0), "slow", scores)
    with pytest.raises(RemoteTimeoutError):
        slow.request([b"x"], 2.0)
    gone = MeasuredTransport(Canned(clock, error=UnreachableError("u")), "gone", scores)
    with pytest.raises(UnreachableError):
        gone.request([b"x"], 2.0)
    assert scores.measure("slow").timeouts == pytest.approx(1, rel=0.01)
    assert scores.measure("slow").latency == 2.0
    assert scores.measure("gone").errors == 1
    gone.close()
    assert gone.inner.closed


def test_error_reply_code_peeks_only_small_single_frames():
    assert error_reply_code(err("overloaded")) == "overloaded"
    assert error_reply_code([memoryview(err("internal")[0])]) == "internal"
    assert error_reply_code([b"a", b"b"]) is None
    assert error_reply_code([object()]) == "garbage"

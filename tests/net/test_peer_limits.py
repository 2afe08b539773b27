"""``PeerLimiter``: token bucket per peer, concurrent requests per peer, a bounded LRU table
of peers. A fake clock makes every step exact (no sleeping, no timing)."""

from __future__ import annotations

import pytest

from volunteer.net.byte_budget import ByteBudget
from volunteer.net.peer_limits import PeerLimiter, PeerLimits, refusal_message


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_bucket_allows_a_burst_then_refills_at_the_rate():
    clock = Clock()
    lim = PeerLimiter(PeerLimits(requests_per_s=2.0, burst=3), clock=clock)
    assert [lim.try_enter("a") for _ in range(4)] == [None, None, None, "rate"]
    assert lim.try_enter("b") is None  # another peer has its own bucket
    for _ in range(3):
        lim.leave("a")
    clock.t += 0.5  # one token back
    assert lim.try_enter("a") is None and lim.try_enter("a") == "rate"
    clock.t += 100.0  # never more than the burst
    assert [lim.try_enter("a") for _ in range(4)] == [None, None, None, "rate"]
    assert lim.stats.rate_limited == 3


def test_concurrency_per_peer_is_bounded_until_leave():
    lim = PeerLimiter(PeerLimits(burst=100, max_concurrent=2), clock=Clock())
    assert [lim.try_enter("a") for _ in range(3)] == [None, None, "concurrency"]
    lim.leave("a")
    assert lim.try_enter("a") is None and lim.inflight("a") == 2
    lim.leave("x")  # unknown peer: harmless
    assert "in flight" in refusal_message("concurrency", lim.limits)


def test_peer_table_is_bounded_lru_and_never_drops_busy_peers():
    clock = Clock()
    lim = PeerLimiter(PeerLimits(max_peers=3, burst=1, requests_per_s=0.001), clock=clock)
    for p in ("a", "b", "c"):
        assert lim.try_enter(p) is None
    assert lim.try_enter("d") == "peers" and len(lim) == 3  # all busy: refused, not tracked
    lim.leave("b")
    assert lim.try_enter("d") is None and len(lim) == 3  # b (idle) was forgotten
    assert lim.stats.evicted == 1 and lim.inflight("b") == 0
    lim.leave("a")
    assert lim.try_enter("a") == "rate"  # a is still tracked: its empty bucket stays empty


def test_limits_are_validated():
    for bad in ({"requests_per_s": 0}, {"burst": 0}, {"max_peers": 0}, {"read_timeout_s": 0}):
        with pytest.raises(ValueError):
            PeerLimits(**bad)
    lim = PeerLimits(read_timeout_s=2.0, min_read_rate=1000)
    assert lim.read_deadline_s(3000) == 5.0


def test_byte_budget_reserves_up_to_capacity():
    b = ByteBudget(10)
    assert b.try_reserve(6) and not b.try_reserve(5) and b.try_reserve(4)
    b.release(6)
    assert b.snapshot() == {"capacity": 10, "held": 4, "peak": 10, "refused": 1}
    with pytest.raises(ValueError):
        ByteBudget(0)

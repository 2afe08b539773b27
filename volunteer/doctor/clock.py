"""Clock skew against the swarm, read from the timestamps peers already sign (pure).

No reply of the protocols carries a peer's clock, but every registry record does: its
``seq`` is the writer's ``time.time_ns()`` when it announced (``ExpertRegistry._next_seq``:
``max(seq + 1, time_ns())``), and its ``expires`` is that moment plus the writer's TTL; a
writer re-announces every half TTL. So for the freshest record of a peer read at our time
``now``, the peer's clock minus ours lies in ``[seq_s - now, seq_s - now + (expires - seq_s) / 2]``
(its announce happened at most one heartbeat ago). ``peer_skews`` gives that interval per
peer; ``swarm_skew`` the median bounds over peers, so one peer with a wrong clock (or one
that lies: a signature proves only who wrote a number) cannot move the verdict.

Why it matters: readers drop a record whose ``expires`` is past by *their* clock, and one
that expires further ahead than the experiment's TTL. A node whose clock is behind the swarm
by more than the TTL announces records everyone drops at once: it cannot serve.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from volunteer.doctor.report import Check, failed, ok, skipped, warn
from volunteer.net.record_fields import MAX_TTL, ServerEntry

WARN_SKEW_S = 10.0
MAX_PLAUSIBLE_S = 10 * 365 * 86400.0  # a seq further than this from now is not a timestamp


@dataclass(frozen=True)
class Skew:
    """Bounds (seconds) on one peer's clock minus ours: ``lo <= skew <= hi``."""

    peer_id: str
    lo: float
    hi: float


def peer_skews(entries: Iterable[ServerEntry], now: float) -> list[Skew]:
    """One interval per peer, from its freshest entry (implausible timestamps dropped)."""
    freshest: dict[str, ServerEntry] = {}
    for e in entries:
        old = freshest.get(e.peer_id)
        if old is None or e.seq > old.seq:
            freshest[e.peer_id] = e
    out = []
    for pid, e in sorted(freshest.items()):
        announced = e.seq / 1e9
        ttl = e.expires - announced
        if not (math.isfinite(announced) and abs(announced - now) < MAX_PLAUSIBLE_S and 0 < ttl <= MAX_TTL):
            continue
        lo = announced - now
        out.append(Skew(pid, round(lo, 3), round(lo + ttl / 2, 3)))
    return out


def swarm_skew(skews: list[Skew]) -> tuple[float, float] | None:
    """Median lower and upper bound over peers, or None without any peer."""
    if not skews:
        return None
    return statistics.median(s.lo for s in skews), statistics.median(s.hi for s in skews)


def check_clock(skews: list[Skew], ttl: float) -> Check:
    """Verdict: fail when our clock is surely off by more than the record TTL, warn past
    ``WARN_SKEW_S``; the interval's width is the method's resolution (half a TTL)."""
    bounds = swarm_skew(skews)
    if bounds is None:
        return skipped("clock", "no peer record to compare clocks with")
    lo, hi = bounds
    data = {"peers": len(skews), "skew_lo_s": lo, "skew_hi_s": hi}
    fix = "synchronise this machine's clock (enable NTP: timedatectl set-ntp true)"
    if lo > ttl:
        return failed("clock", f"this clock is behind the swarm by at least {lo:.0f} s (median of "
                      f"{len(skews)} peer(s)): peers drop this node's records as expired", fix, **data)
    if hi < -WARN_SKEW_S and -hi > MAX_TTL - ttl:
        return failed("clock", f"this clock is ahead of the swarm by at least {-hi:.0f} s: peers drop "
                      "this node's records as expiring too far ahead", fix, **data)
    if lo > WARN_SKEW_S:
        return warn("clock", f"this clock is behind the swarm by {lo:.0f}..{hi:.0f} s "
                    f"({len(skews)} peer(s))", fix, **data)
    if hi < -WARN_SKEW_S:
        return warn("clock", f"this clock is ahead of the swarm by {-hi:.0f}..{-lo:.0f} s "
                    f"({len(skews)} peer(s))", fix, **data)
    return ok("clock", f"no skew found: peers' clocks minus ours lie in {lo:+.0f}..{hi:+.0f} s "
              f"(median of {len(skews)} peer(s), from their signed record timestamps)", **data)

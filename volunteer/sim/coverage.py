"""How fast expert assignment covers a grid, and re-covers it after a mass leave (virtual time).

Each simulated volunteer does what ``daemon.shards.ShardManager`` does, with the product's
own pure functions: on join it reads the swarm's view (``SimRegistry.holders`` ->
``daemon.swarm_view.SwarmView.holders``) and calls ``experts.assignment.plan_assignment``
with its capacity; every ``rebalance_interval_s`` (from its join time) it plans again with
its hosted set (capacity raised to its sole copies, as ``ShardManager.rebalance`` does) and
applies adds and drops. A uid that somebody else already serves takes ``acquire_s`` to
download before it is announced (the worker is busy meanwhile: no re-plan); a uid nobody
serves starts from its deterministic init and is announced at once.

Timeline: ``volunteers`` join at ``join_per_min``; when every uid is served by a live
volunteer (hosted and announced) the grid is covered (``cover_empty_grid_min``); once all
have joined and every uid has its target of replicas (``replication`` where the slots
allow it, else 1) the grid is replicated (``replicate_grid_min``); after ``settle_s`` more,
``leave_fraction`` of them vanish at once without goodbye (their records live out their
TTL); then the time until every uid is back at the target the remaining slots allow
(``recover_after_leave_min``). Moves are adds plus drops made by re-plans (not the first
choice at join); ``moves_after_cover`` counts those in the settle window after the grid was
replicated and ``moves_after_recover`` those after the recovery (0 means no thrash). Views are read once per ``tick_s`` and shared by the volunteers
that plan in that tick (a read takes that long to change anyway).
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from volunteer.daemon.swarm_view import SwarmView
from volunteer.experts.assignment import Holder, plan_assignment
from volunteer.sim.sim_registry import SimRegistry, SimWriter


@dataclass
class _Volunteer:
    writer: SimWriter
    hosted: list[str] = field(default_factory=list)
    busy_until: float = 0.0
    alive: bool = True


@dataclass
class CoverageResult:
    """Minutes to cover and re-cover, and the moves re-plans made (see module docstring)."""

    cover_empty_grid_min: float | None
    replicate_grid_min: float | None
    recover_after_leave_min: float | None
    rebalance_moves: int
    moves_after_cover: int
    moves_after_recover: int
    volunteers: int
    grid_uids: int

    def as_dict(self) -> dict[str, float | int | None]:
        return dict(self.__dict__)


def measure_coverage(volunteers: int, grid: Sequence[str], seed: int, *, capacity: int = 4,
                     replication: int = 2, rebalance_interval_s: float = 60.0,
                     join_per_min: float | None = None, acquire_s: float = 30.0,
                     leave_fraction: float = 0.2, settle_s: float = 600.0, tick_s: float = 5.0,
                     limit_s: float = 4 * 3600.0, sharded: bool = True) -> CoverageResult:
    """Run the timeline of the module docstring; None for a phase that did not finish."""
    rng = random.Random(seed)
    grid = list(grid)
    reg = SimRegistry("sim", sharded=sharded, signed=False, seed=seed)
    rate = join_per_min or max(1.0, volunteers / 5)
    vols = [_Volunteer(SimWriter.make(rng, signed=False)) for _ in range(volunteers)]
    events: list[tuple[float, int, str]] = []  # (time, volunteer index, "join" | "plan" | "announce")
    for i in range(volunteers):
        heapq.heappush(events, (i * 60.0 / rate, i, "join"))
    pending: dict[int, list[str]] = {}
    moves = {"all": 0}
    t, view_at, view = 0.0, -1.0, {}
    covered_at: float | None = None
    stable_at: float | None = None
    joined = False
    killed_at: float | None = None
    recovered_at: float | None = None
    moves_at: list[tuple[float, int]] = []

    def read_view(now: float) -> dict[str, list[Holder]]:
        nonlocal view_at, view
        if now - view_at >= tick_s:
            view = SwarmView(reg.holders(grid, now), me="").holders()
            view_at = now
        return view

    def covered(level: int = 1) -> bool:
        served = Counter(u for v in vols if v.alive for u in v.hosted)
        return all(served[u] >= level for u in grid)

    def target() -> int:
        """``replication`` where the live volunteers' slots allow it, else 1."""
        slots = capacity * sum(v.alive for v in vols)
        return replication if slots >= replication * len(grid) else 1

    def plan(i: int, now: float, first: bool) -> None:
        v = vols[i]
        holders = read_view(now)
        sole = sum(1 for u in v.hosted if not [h for h in holders.get(u, ()) if h.peer_id != v.writer.peer_id])
        plan_ = plan_assignment(grid, max(capacity, sole), v.writer.peer_id, holders,
                                hosted=v.hosted, replication=replication)
        if not first:
            n = len(plan_.add) + len(plan_.drop)
            moves["all"] += n
            if n:
                moves_at.append((now, n))
        keep = [u for u in v.hosted if u not in plan_.drop]
        fresh = [u for u in plan_.add if not [h for h in holders.get(u, ()) if h.peer_id != v.writer.peer_id]]
        download = [u for u in plan_.add if u not in fresh]
        v.hosted = keep + fresh
        reg.announce(v.writer, v.hosted, now, free=max(0, capacity - len(v.hosted)))
        if download:
            pending[i] = download
            v.busy_until = now + acquire_s
            heapq.heappush(events, (v.busy_until, i, "announce"))
        heapq.heappush(events, (max(now + rebalance_interval_s, v.busy_until), i, "plan"))

    while events and t < limit_s:
        t, i, kind = heapq.heappop(events)
        v = vols[i]
        if not v.alive:
            continue
        if kind == "join":
            plan(i, t, first=True)
        elif kind == "announce":
            v.hosted += pending.pop(i, [])
            reg.announce(v.writer, v.hosted, t, free=max(0, capacity - len(v.hosted)))
        elif kind == "plan" and t >= v.busy_until:
            plan(i, t, first=False)
        if covered_at is None and covered():
            covered_at = t
        if stable_at is None and i == volunteers - 1 and kind == "join":
            joined = True
        if stable_at is None and joined and covered(target()):
            stable_at = t
            heapq.heappush(events, (t + settle_s, -1, "kill"))
        if killed_at is not None and recovered_at is None and covered(target()):
            recovered_at = t
            heapq.heappush(events, (t + settle_s, -1, "end"))
        while events and events[0][1] == -1:
            t_k, _, what = heapq.heappop(events)
            if what == "end":
                events.clear()
                break
            killed_at = t_k
            for j in rng.sample(range(volunteers), int(volunteers * leave_fraction)):
                vols[j].alive = False
                reg.kill(vols[j].writer.peer_id, t_k)
            if covered(target()):
                recovered_at = t_k
                heapq.heappush(events, (t_k + settle_s, -1, "end"))

    def moves_between(a: float | None, b: float | None) -> int:
        if a is None:
            return 0
        return sum(n for at, n in moves_at if a <= at < (b if b is not None else float("inf")))

    return CoverageResult(
        cover_empty_grid_min=None if covered_at is None else covered_at / 60.0,
        recover_after_leave_min=(None if recovered_at is None or killed_at is None
                                 else (recovered_at - killed_at) / 60.0),
        rebalance_moves=moves_between(killed_at, None),
        replicate_grid_min=None if stable_at is None else stable_at / 60.0,
        moves_after_cover=moves_between(stable_at, killed_at),
        moves_after_recover=moves_between(recovered_at, None),
        volunteers=volunteers,
        grid_uids=len(grid),
    )

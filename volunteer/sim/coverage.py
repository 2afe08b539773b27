"""How fast expert assignment covers a grid, and re-covers it after a mass leave (virtual time).

Each simulated volunteer does what ``daemon.shards.ShardManager`` does, with the product's
own pure functions: on join it reads the swarm's view (``SimRegistry.holders`` ->
``daemon.swarm_view.SwarmView.holders``) and calls ``experts.assignment.plan_assignment``
with its capacity; every ``rebalance_interval_s`` (from its join time) it plans again with
its hosted set (capacity raised to its sole copies, as ``ShardManager.rebalance`` does) and
applies adds and drops. A uid that somebody else already serves takes ``acquire_s`` to
download before it is announced (the worker is busy meanwhile: no re-plan); a uid nobody
serves starts from its deterministic init and is announced at once.

Timeline: ``volunteers`` join at ``join_per_min``. ``cover_empty_grid_min``: when every uid
is first served by a live volunteer (hosted and announced). ``replicate_grid_min``: when,
all having joined, every uid first has its target of replicas (``replication`` where the
slots allow it, else 1; None if not before the leave). ``settle_s`` after the grid is covered
and everyone joined, ``leave_fraction`` of the volunteers vanish at once without goodbye
(their records live out their TTL); the run goes on for ``after_s``.
``recover_after_leave_min``: until every uid is served again; ``rereplicate_after_leave_min``:
until every uid is back at the target the remaining slots allow (None if not within
``after_s``). Moves are adds plus drops made by re-plans (not the first choice at join):
``rebalance_moves`` after the leave; ``moves_after_cover`` in the second half of the settle
window and ``moves_after_recover`` in the last ``settle_s / 2`` of the run (0: no thrash).
Views are read once per ``tick_s`` and shared by the volunteers
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
    rereplicate_after_leave_min: float | None
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
                     leave_fraction: float = 0.2, settle_s: float = 600.0,
                     after_s: float = 1800.0, tick_s: float = 5.0,
                     sharded: bool = True, horizon_s: float = 6 * 3600.0) -> CoverageResult:
    """Run the timeline of the module docstring (virtual time; reproducible from ``seed``).

    ``horizon_s``: virtual time after the last join at which the run stops whatever it
    reached (a grid with more uids than the volunteers' slots is never covered: its marks
    stay None instead of the run going on for ever)."""
    if volunteers < 1 or capacity < 1 or not grid:
        raise ValueError("need at least one volunteer, one slot each and a grid")
    rng = random.Random(seed)
    grid = list(grid)
    reg = SimRegistry("sim", sharded=sharded, signed=False, seed=seed)
    rate = join_per_min or max(1.0, volunteers / 5)
    vols = [_Volunteer(SimWriter.make(rng, signed=False)) for _ in range(volunteers)]
    events: list[tuple[float, int, str]] = []  # (time, volunteer, "join" | "plan" | "announce")
    for i in range(volunteers):
        heapq.heappush(events, (i * 60.0 / rate, i, "join"))
    last_join = (volunteers - 1) * 60.0 / rate
    pending: dict[int, list[str]] = {}
    view_at, view = -1.0, {}
    marks: dict[str, float] = {}  # covered, replicated, kill, recovered, rereplicated, end
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

    def others(u: str, me: str, holders: dict[str, list[Holder]]) -> bool:
        return any(h.peer_id != me for h in holders.get(u, ()))

    def plan(i: int, now: float, first: bool) -> None:
        v = vols[i]
        holders = read_view(now)
        me = v.writer.peer_id
        sole = sum(1 for u in v.hosted if not others(u, me, holders))
        p = plan_assignment(grid, max(capacity, sole), me, holders, hosted=v.hosted,
                            replication=replication)
        if not first and (p.add or p.drop):
            moves_at.append((now, len(p.add) + len(p.drop)))
        fresh = [u for u in p.add if not others(u, me, holders)]
        download = [u for u in p.add if u not in fresh]
        v.hosted = [u for u in v.hosted if u not in p.drop] + fresh
        reg.announce(v.writer, v.hosted, now, free=max(0, capacity - len(v.hosted)))
        if download:
            pending[i] = download
            v.busy_until = now + acquire_s
            heapq.heappush(events, (v.busy_until, i, "announce"))
        heapq.heappush(events, (max(now + rebalance_interval_s, v.busy_until), i, "plan"))

    def mark(name: str, now: float) -> None:
        marks.setdefault(name, now)

    while events:
        t, i, kind = heapq.heappop(events)
        if "kill" not in marks and "covered" in marks and t >= last_join \
                and t >= marks["covered"] + settle_s and t >= last_join + settle_s:
            marks["kill"] = t
            for j in rng.sample(range(volunteers), int(volunteers * leave_fraction)):
                vols[j].alive = False
                reg.kill(vols[j].writer.peer_id, t)
        if "kill" in marks and t >= marks["kill"] + after_s:
            marks["end"] = t
            break
        if t >= last_join + horizon_s:  # never covered (too few slots): stop, marks stay None
            marks.setdefault("end", t)
            break
        v = vols[i]
        if v.alive:
            if kind == "join":
                plan(i, t, first=True)
            elif kind == "announce":
                v.hosted += pending.pop(i, [])
                reg.announce(v.writer, v.hosted, t, free=max(0, capacity - len(v.hosted)))
            elif kind == "plan" and t >= v.busy_until:
                plan(i, t, first=False)
        if "kill" not in marks:
            if covered():
                mark("covered", t)
            if t >= last_join and covered(target()):
                mark("replicated", t)
        else:
            if covered():
                mark("recovered", t)
            if covered(target()):
                mark("rereplicated", t)

    def minutes(name: str, since: float = 0.0) -> float | None:
        return None if name not in marks else (marks[name] - since) / 60.0

    def moves_between(a: float, b: float) -> int:
        return sum(n for at, n in moves_at if a <= at < b)

    kill = marks.get("kill", float("inf"))
    end = marks.get("end", float("inf"))
    return CoverageResult(
        cover_empty_grid_min=minutes("covered"),
        replicate_grid_min=minutes("replicated"),
        recover_after_leave_min=minutes("recovered", kill) if "kill" in marks else None,
        rereplicate_after_leave_min=minutes("rereplicated", kill) if "kill" in marks else None,
        rebalance_moves=moves_between(kill, end),
        moves_after_cover=moves_between(kill - settle_s / 2, kill),
        moves_after_recover=moves_between(end - settle_s / 2, end),
        volunteers=volunteers,
        grid_uids=len(grid),
    )

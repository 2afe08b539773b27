"""Expert assignment: resume checkpointed uids first, avoid taken ones, spread by seed; and the
swarm-aware plan (fill unserved/under-replicated uids, hysteresis, excess-rank swaps, adopters)."""

from __future__ import annotations

import hashlib
import random

import pytest

from volunteer.experts.assignment import (
    Holder,
    PeerSlots,
    Plan,
    choose_adopter,
    choose_experts,
    plan_assignment,
)

GRID = [f"g.{i}.{j}" for i in range(4) for j in range(4)]
SMALL = [f"s.0.{j}" for j in range(8)]


def test_deterministic_per_seed_and_spread_across_seeds() -> None:
    a = choose_experts(GRID, 4, "node-a")
    assert a == choose_experts(GRID, 4, "node-a")
    picks = {tuple(sorted(choose_experts(GRID, 4, f"node-{i}"))) for i in range(8)}
    assert len(picks) > 1
    assert len(set(a)) == 4 and set(a) <= set(GRID)


def test_checkpointed_first_then_free_ones() -> None:
    chosen = choose_experts(GRID, 3, "s", checkpointed=["g.3.3", "g.0.1", "not.in.grid"])
    assert set(chosen[:2]) == {"g.3.3", "g.0.1"} and len(chosen) == 3
    taken = set(GRID) - {"g.2.2"}
    assert choose_experts(GRID, 1, "s", taken=taken) == ["g.2.2"]


def test_bounds() -> None:
    assert sorted(choose_experts(GRID, 100, "s")) == sorted(GRID)
    assert choose_experts(GRID, 0, "s") == []
    with pytest.raises(ValueError):
        choose_experts(GRID, -1, "s")


# ---------------------------------------------------------------- plan_assignment helpers


def served(holders: dict[str, list[str]], loads: dict[str, float] | None = None) -> dict[str, list[Holder]]:
    """A view: uid -> serving holders (peer ids), each with the uid's load (default 0.3)."""
    loads = loads or {}
    return {uid: [Holder(p, load=loads.get(uid, 0.3)) for p in peers] for uid, peers in holders.items()}


def is_excess(me: str, uid: str, others: list[str], replication: int) -> bool:
    """Rule (c), as documented: rank all holders (me included) by sha256(peer, uid); ranks >= replication may leave."""
    ranked = sorted([*others, me], key=lambda p: hashlib.sha256(f"{p}\x00{uid}".encode()).hexdigest())
    return ranked.index(me) >= replication


def apply(state: dict[str, set[str]], node: str, plan: Plan) -> None:
    assert set(plan.add) <= set(plan.host) and not set(plan.drop) & set(plan.host)
    assert set(plan.reasons) == set(plan.host) | set(plan.drop)
    state[node] = set(plan.host)


def view_from(state: dict[str, set[str]], demand: dict[str, float] | None = None) -> dict[str, list[Holder]]:
    """Every node lists what it hosts; a uid's load is its demand shared among its holders."""
    demand = demand or {}
    by_uid: dict[str, list[str]] = {}
    for node in sorted(state):
        for uid in state[node]:
            by_uid.setdefault(uid, []).append(node)
    return {
        uid: [Holder(p, load=min(1.0, demand.get(uid, 0.3) / len(peers))) for p in peers]
        for uid, peers in by_uid.items()
    }


# ---------------------------------------------------------------- fresh choice


def test_empty_swarm_spreads_and_is_deterministic() -> None:
    plan = plan_assignment(GRID, 4, "node-a", {})
    assert plan == plan_assignment(GRID, 4, "node-a", {})
    assert len(plan.host) == 4 and plan.add == plan.host and plan.drop == ()
    assert all(plan.reasons[u] == "unserved" for u in plan.host)
    b = plan_assignment(GRID, 4, "node-b", {})
    assert set(plan.host) != set(b.host)


def test_all_served_once_fills_second_replicas() -> None:
    view = served({u: [f"p{i}"] for i, u in enumerate(SMALL[:4])} | {u: ["x", "y"] for u in SMALL[4:]})
    plan = plan_assignment(SMALL, 3, "me", view)
    assert set(plan.host) <= set(SMALL[:4]) and len(plan.host) == 3
    assert all(plan.reasons[u] == "1 of 2 replicas" for u in plan.host)


def test_unserved_beat_under_replicated() -> None:
    view = served({u: ["p"] for u in SMALL[2:]})
    plan = plan_assignment(SMALL, 3, "me", view, replication=3)
    assert set(plan.host[:2]) == set(SMALL[:2]) and plan.host[2] in SMALL[2:]
    assert plan.reasons[plan.host[2]] == "1 of 3 replicas"
    # fewest replicas first among the under-replicated
    view = served({SMALL[0]: ["a", "b"], **{u: ["a"] for u in SMALL[1:]}}) | {SMALL[1]: []}
    assert plan_assignment(SMALL, 1, "me", view, replication=3).host == (SMALL[1],)
    view[SMALL[1]] = [Holder("a")]
    assert SMALL[0] not in plan_assignment(SMALL, 7, "me", view, replication=3).host
    assert plan_assignment(SMALL, 8, "me", view, replication=3).host[-1] == SMALL[0]


def test_hot_uid_picked_once_everything_at_target() -> None:
    view = served({u: ["p", "q"] for u in SMALL}, loads={SMALL[5]: 0.9, SMALL[2]: 0.6})
    plan = plan_assignment(SMALL, 2, "me", view)
    assert plan.host == (SMALL[5], SMALL[2])
    assert plan.reasons[SMALL[5]] == "most loaded (0.90)"


def test_checkpointed_preferred_among_equals() -> None:
    first = plan_assignment(SMALL, 1, "me", {}).host[0]
    other = next(u for u in SMALL if u != first)
    plan = plan_assignment(SMALL, 1, "me", {}, checkpointed=[other, "not.in.grid"])
    assert plan.host == (other,) and plan.reasons[other] == "resume checkpoint (unserved)"
    # ... but only among equals: an unserved uid beats a checkpointed 1-of-2 one
    view = served({u: ["p"] for u in SMALL if u != first})
    assert plan_assignment(SMALL, 1, "me", view, checkpointed=[other]).host == (first,)


def test_uid_held_only_by_draining_peer_counts_as_unserved() -> None:
    view = served({u: ["p"] for u in SMALL})
    view[SMALL[6]] = [Holder("leaving", load=0.1, state="draining")]
    plan = plan_assignment(SMALL, 1, "me", view)
    assert plan.host == (SMALL[6],) and plan.reasons[SMALL[6]] == "unserved"


# ---------------------------------------------------------------- rebalance


def test_hysteresis_under_load_noise() -> None:
    others = [f"q{i}" for i in range(5)]
    hosted = SMALL[:2]
    me = next(f"me-{i}" for i in range(1000) if all(is_excess(f"me-{i}", u, others, 2) for u in hosted))
    holders = {u: others for u in hosted} | {u: ["x", "y"] for u in SMALL[2:]}
    rng = random.Random(7)
    for _ in range(200):
        view = {
            u: [Holder(p, load=(0.75 if u == SMALL[7] else 0.35) + rng.uniform(-0.05, 0.05)) for p in peers]
            for u, peers in holders.items()
        }
        plan = plan_assignment(SMALL, 2, me, view, hosted=hosted)
        assert plan.add == () and plan.drop == () and set(plan.host) == set(hosted)
        assert plan.reasons[SMALL[0]].startswith("keep (5 other replicas")
    # positive control: a clearly hot uid does pull this (excess) node over
    loads = {SMALL[7]: 1.0, SMALL[0]: 0.1, SMALL[1]: 0.2}
    plan = plan_assignment(SMALL, 2, me, served(holders, loads), hosted=hosted)
    assert plan.drop == (SMALL[0],) and plan.add == (SMALL[7],)
    assert plan.reasons[SMALL[0]].startswith("less loaded (0.10) -> moved to s.0.7")


def test_sole_holder_never_leaves_and_swap_needs_over_coverage() -> None:
    view = served({SMALL[0]: [], SMALL[1]: ["p"]})
    for hosted in ([SMALL[0]], [SMALL[1]]):  # others 0, or 1 < replication 2: stay, despite unserved uids
        assert plan_assignment(SMALL, 1, "me", view, hosted=hosted).drop == ()


@pytest.mark.parametrize("replication", [1, 2])
@pytest.mark.parametrize("nodes", [3, 4])
def test_excess_rank_rule_moves_exactly_the_excess(replication: int, nodes: int) -> None:
    grid = ["x", "y", "z"]
    names = [f"n{i}" for i in range(nodes)]
    state = {n: {"x"} for n in names} | {"z1": {"z"}, "z2": {"z"}}
    view = view_from(state)
    plans = {n: plan_assignment(grid, 1, n, view, hosted=["x"], replication=replication) for n in names}
    movers = {n for n, p in plans.items() if p.drop}
    assert len(movers) == nodes - replication
    assert movers == {n for n in names if is_excess(n, "x", [m for m in names if m != n], replication)}
    for n in movers:
        assert plans[n].add == ("y",) and plans[n].reasons["x"].startswith(f"over-covered ({nodes - 1} other replicas)")
        apply(state, n, plans[n])
    view = view_from(state)
    for n in names:
        plan = plan_assignment(grid, 1, n, view, hosted=sorted(state[n]), replication=replication)
        assert plan.add == () and plan.drop == ()


@pytest.mark.parametrize("replication", [1, 2])
@pytest.mark.parametrize("start", ["empty", "crowded", *(f"random-{s}" for s in range(6))])
def test_swarm_converges_without_oscillation(replication: int, start: str) -> None:
    rng = random.Random(f"{start}-{replication}")
    names = [f"node-{i}" for i in range(6)]
    demand = {u: rng.uniform(0.0, 2.0) for u in SMALL}
    if start == "empty":
        state: dict[str, set[str]] = {n: set() for n in names}
    elif start == "crowded":
        state = {n: set(SMALL[:2]) for n in names}
    else:
        state = {n: set(rng.sample(SMALL, 2)) for n in names}
    moves = 0
    for _ in range(12):
        changed = False
        for n in names:
            plan = plan_assignment(SMALL, 2, n, view_from(state, demand), hosted=sorted(state[n]),
                                   replication=replication)
            changed |= bool(plan.add or plan.drop)
            moves += len(plan.drop)
            apply(state, n, plan)
        if not changed:
            break
    else:
        pytest.fail(f"no convergence: {state}")
    counts = {u: sum(u in s for s in state.values()) for u in SMALL}
    assert all(len(s) == 2 for s in state.values())
    assert min(counts.values()) >= 1, counts
    assert moves <= 12, moves  # each of the 12 slots moves at most once or so: no ping-pong


def test_random_swarms_converge_in_few_rounds() -> None:
    for seed in range(40):
        rng = random.Random(seed)
        grid = [f"r.0.{i}" for i in range(rng.randint(1, 16))]
        names = [f"n{i}" for i in range(rng.randint(1, 10))]
        capacity = {n: rng.randint(0, 4) for n in names}
        demand = {u: rng.uniform(0.0, 3.0) for u in grid}
        replication = rng.randint(1, 3)
        state = {n: set(rng.sample(grid, min(len(grid), rng.randint(0, 4)))) for n in names}
        for _ in range(4):
            changed = False
            for n in rng.sample(names, len(names)):
                plan = plan_assignment(grid, capacity[n], n, view_from(state, demand), hosted=sorted(state[n]),
                                       replication=replication)
                changed |= bool(plan.add or plan.drop)
                apply(state, n, plan)
            if not changed:
                break
        else:
            pytest.fail(f"seed {seed}: no convergence in 4 rounds")
        assert all(len(state[n]) == min(capacity[n], len(grid)) for n in names)
        counts = [sum(u in s for s in state.values()) for u in grid]
        if 0 in counts:  # an unserved uid left only when nobody holds an excess replica to give up
            assert max(counts) <= replication, (seed, counts)


def test_plan_is_stable_after_applying_it() -> None:
    rng = random.Random(3)
    for _ in range(200):
        peers = [f"p{i}" for i in range(rng.randint(0, 6))]
        holders = {u: rng.sample(peers, rng.randint(0, len(peers))) for u in SMALL}
        view = {u: [Holder(p, load=rng.random()) for p in ps] for u, ps in holders.items()}
        hosted = rng.sample([*SMALL, "gone.0.0"], rng.randint(0, 5))
        kw = {"replication": rng.randint(1, 3), "load_margin": rng.choice([0.0, 0.2, 0.5])}
        plan = plan_assignment(SMALL, rng.randint(0, 4), "me", view, hosted=hosted, **kw)
        after = {u: [*hs, *([Holder("me")] if u in plan.host else [])] for u, hs in view.items()}
        again = plan_assignment(SMALL, len(plan.host), "me", after, hosted=plan.host, **kw)
        assert again.add == () and again.drop == () and set(again.host) == set(plan.host)


def test_hostile_view_is_clamped_not_trusted() -> None:
    nan, inf = float("nan"), float("inf")
    clean = {
        SMALL[0]: [Holder("a", 1.0), Holder("b", 1.0)],
        SMALL[1]: [Holder("a", 0.0)],
        SMALL[2]: [Holder("c", 1.0), Holder("d", 0.4)],
    }
    hostile: dict = {
        SMALL[0]: [Holder("a", nan, version=10**100), Holder("b", inf), Holder("a", nan), Holder("me", 0.0)],
        SMALL[1]: [Holder("a", -3.0, version=-(10**30)), Holder("a", -1e308), Holder("ghost", 0.1, state="drain")],
        SMALL[2]: [Holder("c", 7.0), Holder("d", 0.4), Holder("d", 0.4), Holder("", 0.1), 42, object(), None],
        SMALL[3]: [Holder("me", 0.1), Holder(None, 0.1), Holder("e", "x", state=None)],  # type: ignore[arg-type]
        SMALL[4]: "not-a-list",
        SMALL[5]: None,
        SMALL[6]: [Holder("f", "zzz", state="draining")],  # type: ignore[arg-type]
        "not.in.grid": [Holder("z", 0.1)] * 50,
        7: [Holder("z", 0.1)],
    }
    for capacity, hosted in ((3, ()), (8, ()), (2, (SMALL[0], SMALL[2])), (1, (SMALL[1], "gone"))):
        for replication in (1, 2):
            expected = plan_assignment(SMALL, capacity, "me", clean, hosted=hosted, replication=replication)
            got = plan_assignment(SMALL, capacity, "me", hostile, hosted=hosted, replication=replication)
            assert got == expected
    junk: object = None
    from_junk = plan_assignment(SMALL, 2, "me", junk)  # type: ignore[arg-type]
    assert from_junk == plan_assignment(SMALL, 2, "me", {})
    peers = {"a": PeerSlots(1), "b": PeerSlots(2)}
    assert choose_adopter(SMALL[1], "me", peers, hostile) == choose_adopter(SMALL[1], "me", peers, clean) == "b"


def test_capacity_bounds_and_over_capacity_drops() -> None:
    assert plan_assignment(SMALL, 0, "me", {}) == Plan((), (), (), {})
    assert set(plan_assignment(SMALL, 100, "me", {}).host) == set(SMALL)
    with pytest.raises(ValueError):
        plan_assignment(SMALL, -1, "me", {})
    with pytest.raises(ValueError):
        plan_assignment(SMALL, 1, "me", {}, replication=0)
    with pytest.raises(ValueError):
        plan_assignment(SMALL, 1, "me", {}, load_margin=float("nan"))
    dropped = plan_assignment(SMALL, 0, "me", {}, hosted=SMALL[:2])
    assert dropped.host == () and set(dropped.drop) == set(SMALL[:2])
    assert dropped.reasons[SMALL[0]] == "over capacity (sole holder)"
    # sole holder and 1-of-2 are kept, over-covered ones go first, the least loaded of them first
    # (on a 4-uid grid, so that no swap target exists whatever the hash ranks)
    view = served({SMALL[1]: ["p"], SMALL[2]: ["p", "q", "r"], SMALL[3]: ["p", "q", "r"]},
                  loads={SMALL[2]: 0.2, SMALL[3]: 0.9})
    plan = plan_assignment(SMALL[:4], 3, "me", view, hosted=[SMALL[3], SMALL[2], SMALL[1], SMALL[0], "gone.0.0"])
    assert plan.host == (SMALL[0], SMALL[1], SMALL[3]) and plan.add == ()
    assert plan.drop == (SMALL[2], "gone.0.0")
    assert plan.reasons[SMALL[2]] == "over capacity (3 other replicas)"
    assert plan.reasons["gone.0.0"] == "not in the grid"
    # a free slot is filled as in the fresh choice
    grown = plan_assignment(SMALL, 2, "me", {SMALL[1]: [Holder("p")]}, hosted=[SMALL[1]])
    assert grown.drop == () and len(grown.add) == 1 and grown.reasons[grown.add[0]] == "unserved"


def test_choose_adopter() -> None:
    uid = SMALL[0]
    assert choose_adopter(uid, "me", {}, {}) is None
    assert choose_adopter(uid, "me", {"me": PeerSlots(5)}, {}) is None
    view = served({uid: ["e"]})
    peers = {
        "me": PeerSlots(9, 0.0),
        "a": PeerSlots(0, 0.0),
        "b": PeerSlots(3, 0.5),
        "c": PeerSlots(1, 0.2),
        "d": PeerSlots(5, 0.2),
        "e": PeerSlots(9, 0.0),  # already serves uid
    }
    assert choose_adopter(uid, "me", peers, view) == "d"  # lowest load, then most free slots
    assert choose_adopter(uid, "me", {"x": PeerSlots(2, 0.1), "y": PeerSlots(2, 0.1)}, {}) in {"x", "y"}
    tie = {f"t{i}": PeerSlots(2, 0.1) for i in range(8)}
    assert len({choose_adopter(u, "me", tie, {}) for u in SMALL}) > 1  # spread by hash(peer, uid)
    # nobody has room: the least loaded peer that does not serve uid yet
    full = {"a": PeerSlots(0, 0.3), "b": PeerSlots(0, 0.1), "e": PeerSlots(0, 0.0)}
    assert choose_adopter(uid, "me", full, view) == "b"
    assert choose_adopter(uid, "me", {"e": PeerSlots(4)}, view) is None
    # untrusted numbers: inf/negative free -> no room, NaN load -> 1.0, huge free clamped
    odd = {
        "a": PeerSlots(float("inf"), 0.0),  # type: ignore[arg-type]
        "b": PeerSlots(-5, 0.0),
        "c": PeerSlots(10**9, float("nan")),
        "d": PeerSlots(1, 0.9),
    }
    assert choose_adopter(uid, "me", odd, view) == "d"
    assert choose_adopter(uid, "me", {"a": odd["a"], "b": odd["b"]}, view) in {"a", "b"}

"""The registry level of the swarm simulator: discoverability under capped keys (old layout
vs sharded keys), beam-search cost, assignment coverage; reproducible from a seed."""

from __future__ import annotations

import random

import pytest

from volunteer.net import key_shards, records
from volunteer.sim.coverage import measure_coverage
from volunteer.sim.grid_scale import discoverability, grid_uids, measure_grid
from volunteer.sim.sim_registry import SimRegistry, SimWriter

TIMINGS = ("cpu_s", "announce_cpu_s")


def _figures(out: dict) -> dict:
    out = {k: v for k, v in out.items() if k not in TIMINGS}
    out["old_layout"] = {k: v for k, v in out["old_layout"].items() if k not in TIMINGS}
    return out


def test_smoke_figures_are_reproducible_from_the_seed():
    a = measure_grid(24, seed=7, preset="smoke")
    b = measure_grid(24, seed=7, preset="smoke")
    assert _figures(a) == _figures(b)
    assert a["peers"] == 24 and a["grid"] == "8x8"


def test_caps_larger_than_the_swarm_list_every_server_in_both_layouts():
    out = measure_grid(40, seed=1, preset="smoke", coverage=False)
    for figs in (out, out["old_layout"]):
        assert figs["discoverable_servers_fraction"] == 1.0
        assert figs["root_children_listed_fraction"] == 1.0
        assert figs["hot_uid_servers_listed_fraction"] == 1.0
        assert figs["key_full_refusals"] == 0 and figs["other_drops"] == 0
    # below the cap the sharded layout reads exactly what the old one read
    assert out["beam_lookups_per_step"] == out["old_layout"]["beam_lookups_per_step"]
    assert out["beam_servers_chosen"] > 0


def _row_swarm(sharded: bool, n: int, cap: int):
    """``n`` signed writers, each serving one uid of row 0, announced in order."""
    rng = random.Random(3)
    reg = SimRegistry("sim", sharded=sharded, signed=True, max_entries=cap, seed=3)
    writers = [SimWriter.make(rng, signed=True) for _ in range(n)]
    hosting = {w.peer_id: [f"sim.ffn.0.{i}"] for i, w in enumerate(writers)}
    for w in writers:
        reg.announce(w, hosting[w.peer_id], now=1000.0)
    return reg, writers, hosting


def test_old_layout_hides_servers_past_the_cap_and_sharded_keys_list_them():
    cap, n = 8, 30
    old, writers, hosting = _row_swarm(False, n, cap)
    got_old = discoverability(old, hosting, now=1001.0)
    # hand-computed: the base key keeps the first `cap` writers (held entries win)
    assert got_old["discoverable_servers_fraction"] == pytest.approx(cap / n)
    assert {e.peer_id for e in old.lookup("sim.ffn.0.", 1001.0)} == {w.peer_id for w in writers[:cap]}
    assert got_old["key_full_refusals"] == 2 * (n - cap)  # the row key and the root key

    new, _w, _h = _row_swarm(True, n, cap)
    listed = {e.peer_id for e in new.lookup("sim.ffn.0.", 1001.0)}
    # hand-computed: the base key's first `cap` writers, plus the first `cap` of each shard
    per_shard: dict[int, list[str]] = {}
    for w in writers:
        per_shard.setdefault(key_shards.shard_of(w.peer_id), []).append(w.peer_id)
    want = {w.peer_id for w in writers[:cap]} | {p for ps in per_shard.values() for p in ps[:cap]}
    assert listed == want
    assert len(listed) > cap
    got_new = discoverability(new, hosting, now=1001.0)
    assert got_new["discoverable_servers_fraction"] == pytest.approx(len(want) / n)
    assert got_new["discoverable_servers_fraction"] > got_old["discoverable_servers_fraction"]


def test_entries_filed_under_the_wrong_shard_are_refused():
    rng = random.Random(5)
    reg = SimRegistry("sim", sharded=True, signed=True, seed=5)
    w = SimWriter.make(rng, signed=True)
    reg.announce(w, ["sim.ffn.0.1"], now=10.0)
    entry, blob = reg.store[records.dht_key("sim", "sim.ffn.0.")][w.peer_id]
    wrong = next(k for k in key_shards.shard_keys("sim", "sim.ffn.0.")
                 if k != key_shards.writer_shard_key("sim", "sim.ffn.0.", w.peer_id))
    assert not reg.put(wrong, entry, blob, now=10.0)
    assert reg.stats.get("wrong_key") == 1


def test_a_small_grid_is_covered_at_once_and_nobody_moves_after():
    grid = grid_uids((2, 2))
    # one volunteer with room for the whole grid covers it at its join (t = 0)
    one = measure_coverage(1, grid, seed=2, capacity=4, replication=1, settle_s=300.0)
    assert one.cover_empty_grid_min == 0.0
    # 6 volunteers x 2 slots over 4 uids: replication 2 fits (12 >= 8), no thrash after
    res = measure_coverage(6, grid, seed=2, capacity=2, replication=2, settle_s=600.0)
    assert res.cover_empty_grid_min is not None and res.replicate_grid_min is not None
    assert res.cover_empty_grid_min <= res.replicate_grid_min
    assert res.moves_after_cover == 0
    assert res.recover_after_leave_min is not None and res.moves_after_recover == 0
    # after 1 of 6 leaves, 10 slots still fit 2 replicas of 4 uids: restored, then quiet
    assert res.rereplicate_after_leave_min is not None


def test_a_grid_larger_than_the_volunteers_slots_stops_at_the_horizon_uncovered():
    """100 volunteers x 4 slots cannot cover 512 uids (the full preset at N=100): the run ends
    at its virtual horizon with the marks it never reached as None (it used to run for ever)."""
    res = measure_coverage(3, grid_uids((4, 4)), seed=2, capacity=2, replication=1, horizon_s=3600.0)
    assert res.cover_empty_grid_min is None and res.recover_after_leave_min is None
    assert res.rebalance_moves == 0


def test_dropped_uids_are_withdrawn_so_views_match_what_is_hosted():
    reg = SimRegistry("sim", sharded=True, signed=False, seed=1)
    w = SimWriter.make(random.Random(1), signed=False)
    reg.announce(w, ["sim.ffn.0.1", "sim.ffn.1.2"], now=0.0)
    reg.announce(w, ["sim.ffn.0.1"], now=1.0)
    held = reg.holders(["sim.ffn.0.1", "sim.ffn.1.2"], now=2.0)
    assert [e.peer_id for e in held["sim.ffn.0.1"]] == [w.peer_id]
    assert held["sim.ffn.1.2"] == []


def test_coverage_is_reproducible_from_the_seed():
    grid = grid_uids((4, 4))
    a = measure_coverage(12, grid, seed=9, capacity=4)
    b = measure_coverage(12, grid, seed=9, capacity=4)
    assert a == b


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        measure_grid(10, seed=1, preset="huge")
    with pytest.raises(ValueError):
        measure_grid(0, seed=1, preset="smoke")

"""Expert assignment: resume checkpointed uids first, avoid taken ones, spread by seed."""

from __future__ import annotations

import pytest

from volunteer.experts.assignment import choose_experts

GRID = [f"g.{i}.{j}" for i in range(4) for j in range(4)]


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

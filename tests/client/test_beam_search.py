"""Beam search over the expert grid against brute force on small grids."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from volunteer.client.beam_search import beam_search
from volunteer.client.directory import StaticDirectory, make_uid


class _Token:
    """A stand-in transport object: beam search only passes transports through."""

    def request(self, frames, timeout):
        raise AssertionError("beam search must not send requests")

    def close(self):
        pass


class _CountingDirectory(StaticDirectory):
    def __init__(self, mapping):
        super().__init__(mapping)
        self.children_calls: list[list[str]] = []
        self.resolve_calls: list[list[str]] = []

    def children(self, prefixes):
        self.children_calls.append(list(prefixes))
        return super().children(prefixes)

    def resolve(self, uids):
        self.resolve_calls.append(list(uids))
        return super().resolve(uids)


def _brute_force(scores, prefix, alive, k, exclude=()):
    batch = scores[0].shape[0]
    result = []
    for b in range(batch):
        ranked = sorted(
            (
                (-sum(float(scores[i][b, c]) for i, c in enumerate(coords)), coords)
                for coords in alive
                if make_uid(prefix, coords) not in exclude
            ),
        )
        result.append([make_uid(prefix, coords) for _, coords in ranked[:k]])
    return result


def _random_case(rng: random.Random, dims, density):
    cells = list(itertools.product(*(range(d) for d in dims)))
    alive = [c for c in cells if rng.random() < density]
    return alive


@pytest.mark.parametrize("seed", range(30))
def test_wide_beam_equals_brute_force(seed):
    rng = random.Random(seed)
    ndim = rng.choice([1, 2, 3])
    dims = [rng.randint(1, 5) for _ in range(ndim)]
    alive = _random_case(rng, dims, density=rng.choice([0.2, 0.5, 1.0]))
    prefix = rng.choice(["ffn", "demo.ffn"])
    gen = torch.Generator().manual_seed(seed)
    scores = [torch.randn(7, d, generator=gen) for d in dims]
    k = rng.randint(1, 6)
    token = _Token()
    directory = _CountingDirectory({make_uid(prefix, c): token for c in alive})
    # a beam as wide as the grid never prunes, so the search is exact
    beam = 1
    for d in dims:
        beam *= d
    exclude = {make_uid(prefix, c) for c in alive if rng.random() < 0.2}
    found = beam_search(scores, prefix, directory, beam_size=beam, k_best=k, exclude=exclude)
    assert found.uids == _brute_force(scores, prefix, alive, k, exclude)
    for uids, coords in zip(found.uids, found.coords, strict=True):
        assert [make_uid(prefix, c) for c in coords] == uids
    assert set(found.transports) == {u for uids in found.uids for u in uids}
    assert all(t is token for t in found.transports.values())
    # one batched children call per dimension at most, one resolve
    assert len(directory.children_calls) <= ndim
    assert len(directory.resolve_calls) <= 1


@pytest.mark.parametrize("seed", range(20))
def test_narrow_beam_returns_alive_sorted_distinct(seed):
    rng = random.Random(100 + seed)
    dims = [rng.randint(2, 6), rng.randint(2, 6)]
    alive = _random_case(rng, dims, density=0.4)
    gen = torch.Generator().manual_seed(seed)
    scores = [torch.randn(5, d, generator=gen) for d in dims]
    directory = StaticDirectory({make_uid("g", c): _Token() for c in alive})
    k = 3
    found = beam_search(scores, "g", directory, beam_size=2, k_best=k)
    alive_uids = {make_uid("g", c) for c in alive}
    for b, (uids, coords) in enumerate(zip(found.uids, found.coords, strict=True)):
        assert len(set(uids)) == len(uids) <= k
        assert set(uids) <= alive_uids
        totals = [float(scores[0][b, c[0]] + scores[1][b, c[1]]) for c in coords]
        assert totals == sorted(totals, reverse=True)
        # with a beam of 2 the best first coordinates (that have alive children) are kept,
        # so the best expert under the best first coordinate is always found
        if alive:
            firsts = sorted({c[0] for c in alive}, key=lambda i: (-float(scores[0][b, i]), i))
            best_first = firsts[0]
            best = max(
                (c for c in alive if c[0] == best_first),
                key=lambda c: (float(scores[1][b, c[1]]), -c[1]),
            )
            assert make_uid("g", best) in uids or len(uids) == k


def test_narrow_beam_looks_past_prefixes_whose_experts_are_excluded():
    # the best first coordinate (0) only has excluded experts (a leaving volunteer's)
    directory = _CountingDirectory({make_uid("p", c): _Token() for c in [(0, 0), (0, 1), (1, 1), (2, 0)]})
    scores = [torch.tensor([[9.0, 1.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    exclude = {"p.0.0", "p.0.1"}
    found = beam_search(scores, "p", directory, beam_size=1, k_best=1, exclude=exclude)
    assert found.uids == [["p.1.1"]]
    assert directory.children_calls[1] == ["p.0.", "p.1."]  # the tainted prefix cost one extra lookup
    # nothing excluded: the plain narrow beam, no extra lookups
    directory.children_calls.clear()
    assert beam_search(scores, "p", directory, beam_size=1, k_best=1).uids == [["p.0.1"]]
    assert directory.children_calls[1] == ["p.0."]


@pytest.mark.parametrize("seed", range(20))
def test_narrow_beam_finds_an_expert_whenever_one_is_not_excluded(seed):
    rng = random.Random(200 + seed)
    ndim = rng.choice([2, 3])
    dims = [rng.randint(2, 5) for _ in range(ndim)]
    alive = _random_case(rng, dims, density=0.5)
    exclude = {make_uid("g", c) for c in alive if rng.random() < 0.6}
    gen = torch.Generator().manual_seed(seed)
    scores = [torch.randn(6, d, generator=gen) for d in dims]
    directory = _CountingDirectory({make_uid("g", c): _Token() for c in alive})
    found = beam_search(scores, "g", directory, beam_size=1, k_best=2, exclude=exclude)
    brute = _brute_force(scores, "g", alive, 2, exclude)
    for uids, best in zip(found.uids, brute, strict=True):
        assert not set(uids) & exclude
        assert bool(uids) == bool(best)  # never empty-handed while a usable expert is alive
    for queries in directory.children_calls:  # the beam grows by at most len(exclude)
        assert len(queries) <= 6 * (1 + len(exclude))


def test_one_dimension_beam_k_is_exact_top_k():
    scores = [torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.4, 0.3, 0.2, 0.1]])]
    directory = StaticDirectory({f"e.{i}": _Token() for i in (0, 2, 3)})
    found = beam_search(scores, "e", directory, beam_size=2, k_best=2)
    assert found.uids == [["e.3", "e.2"], ["e.0", "e.2"]]
    assert found.coords == [[(3,), (2,)], [(0,), (2,)]]


def test_ties_broken_by_coordinates_deterministically():
    scores = [torch.zeros(2, 3), torch.zeros(2, 3)]
    directory = StaticDirectory({make_uid("t", c): _Token() for c in [(2, 1), (0, 2), (0, 1)]})
    found = beam_search(scores, "t", directory, beam_size=9, k_best=3)
    assert found.uids == [["t.0.1", "t.0.2", "t.2.1"]] * 2


def test_out_of_grid_and_missing_answers_are_ignored():
    class Liar(StaticDirectory):
        def children(self, prefixes):
            out = super().children(prefixes)
            return {q: [*v, 99, -1] for q, v in out.items()}

        def resolve(self, uids):
            # "e.1.0" is listed but no longer resolvable (left between the two lookups)
            return {u: t for u, t in super().resolve(uids).items() if u != "e.1.0"}

    directory = Liar({make_uid("e", c): _Token() for c in [(0, 0), (1, 0), (1, 1)]})
    scores = [torch.tensor([[0.0, 5.0]]), torch.tensor([[4.0, 0.0]])]
    found = beam_search(scores, "e", directory, beam_size=4, k_best=3)
    assert found.uids == [["e.1.1", "e.0.0"]]


def test_empty_directory_gives_empty_choices():
    found = beam_search([torch.randn(3, 4)], "x", StaticDirectory({}), beam_size=2, k_best=2)
    assert found.uids == [[], [], []]
    assert found.transports == {}


def test_rejects_bad_arguments():
    directory = StaticDirectory({})
    with pytest.raises(ValueError):
        beam_search([], "x", directory, beam_size=1, k_best=1)
    with pytest.raises(ValueError):
        beam_search([torch.randn(3, 4)], "x", directory, beam_size=0, k_best=1)
    with pytest.raises(ValueError):
        beam_search([torch.randn(3, 4), torch.randn(2, 4)], "x", directory, beam_size=1, k_best=1)

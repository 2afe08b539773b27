"""Beam search over the expert grid: the best alive experts for each sample.

The gate scores each grid dimension separately; an expert ``prefix.i.j`` scores
``s0[i] + s1[j]``. Searching all ``d0 * d1 * ...`` experts per sample would not scale and most
grid cells may be empty, so the search goes dimension by dimension, keeping the
``beam_size`` best prefixes per sample and asking the directory which next coordinates are
alive (one batched ``children`` call per dimension for every sample's prefixes), then one
batched ``resolve`` for the final candidates. It is a pure function of its inputs (scores,
directory answers, exclusions): ties are broken by coordinates, so results are deterministic.

With ``beam_size`` at least the number of alive prefixes at every level the result equals
brute force (top ``k_best`` of all alive experts by summed score); a smaller beam trades
exactness for fewer lookups, exactly as in Learning@home / hivemind.

Excluded experts (the trainer's avoid list: draining, vanished) are skipped at the last
level, and a prefix with an excluded expert under it does not take one of the
``beam_size`` places at the levels above: the beam keeps it *in addition*, so a narrow beam
cannot end up holding only prefixes whose experts are all excluded while others are alive.
That costs at most ``len(exclude)`` extra prefixes per sample and level, and none when
nothing is excluded.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from volunteer.client.directory import ExpertDirectory, make_uid

if TYPE_CHECKING:
    from volunteer.wire.transport import Transport

__all__ = ["BeamSearchResult", "beam_search"]


@dataclass(frozen=True)
class BeamSearchResult:
    """Per sample, the chosen experts best first (at most ``k_best`` each).

    ``uids[b]``: sample ``b``'s expert uids; ``coords[b]``: their grid coordinates (same
    order); ``transports``: uid -> the ``Transport`` the directory resolved it to.
    """

    uids: list[list[str]]
    coords: list[list[tuple[int, ...]]]
    transports: dict[str, Transport]


def _query(prefix: str, coords: tuple[int, ...]) -> str:
    return make_uid(prefix, coords) + "."


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def _ancestor_queries(uid: str, uid_prefix: str) -> list[str]:
    """The prefix queries above ``uid`` below the grid root: "p.3.7" -> ["p.3."]."""
    head = uid_prefix + "."
    if not uid.startswith(head):
        return []
    parts = uid[len(head):].split(".")
    return [head + ".".join(parts[:n]) + "." for n in range(1, len(parts))]


def _keep_untainted(
    candidates: list[tuple[tuple[int, ...], float]], keep: int, uid_prefix: str, tainted: set[str]
) -> list[tuple[tuple[int, ...], float]]:
    """Best first: ``keep`` untainted prefixes, plus the tainted ones ranked above the last."""
    kept, clean = [], 0
    for cand in sorted(candidates, key=lambda t: (-t[1], t[0])):
        if clean == keep:
            break
        kept.append(cand)
        if _query(uid_prefix, cand[0]) not in tainted:
            clean += 1
    return kept


def beam_search(
    grid_scores: Sequence[torch.Tensor],
    uid_prefix: str,
    directory: ExpertDirectory,
    beam_size: int,
    k_best: int,
    exclude: Collection[str] = (),
) -> BeamSearchResult:
    """Find up to ``k_best`` alive experts per sample with the highest summed grid score.

    ``grid_scores[i]`` has shape ``(batch, d_i)``: the gate's scores for coordinate ``i``.
    ``uid_prefix``: the grid's prefix (uids are ``<uid_prefix>.<i>.<j>``); ``directory``
    answers which coordinates are alive. ``beam_size``: prefixes kept per sample and level;
    at least ``k_best``, larger when the grid is sparsely served (exact with a beam as wide
    as the alive prefixes; see the module docstring). ``exclude`` holds uids to skip (e.g.
    recently draining experts). Coordinates the directory reports outside the grid are
    ignored. ``RemoteMixtureOfExperts`` calls this; call it yourself only for custom routing.
    """
    if not grid_scores:
        raise ValueError("grid_scores must have one tensor per grid dimension")
    if beam_size < 1 or k_best < 1:
        raise ValueError(f"beam_size and k_best must be >= 1, got {beam_size}, {k_best}")
    batch = grid_scores[0].shape[0]
    for s in grid_scores:
        if s.dim() != 2 or s.shape[0] != batch:
            raise ValueError("each grid score tensor must be (batch, d_i) with the same batch")
    dims = [int(s.shape[1]) for s in grid_scores]
    scores = [s.detach().to("cpu", torch.float64).tolist() for s in grid_scores]
    excluded = set(exclude)
    # prefix queries ("p.3.") with an excluded expert somewhere under them
    tainted = {q for uid in excluded for q in _ancestor_queries(uid, uid_prefix)}

    # beams[b]: list of (coords, score) kept for sample b
    beams: list[list[tuple[tuple[int, ...], float]]] = [[((), 0.0)] for _ in range(batch)]
    for dim, size in enumerate(dims):
        last = dim == len(dims) - 1
        queries = list(dict.fromkeys(_query(uid_prefix, c) for beam in beams for c, _ in beam))
        alive = directory.children(queries) if queries else {}
        keep = max(beam_size, k_best) if last else beam_size
        new_beams = []
        for b, beam in enumerate(beams):
            row = scores[dim][b]
            candidates = []
            for coords, score in beam:
                for c in alive.get(_query(uid_prefix, coords), ()):
                    if not isinstance(c, int) or not 0 <= c < size:
                        continue
                    full = (*coords, c)
                    if last and make_uid(uid_prefix, full) in excluded:
                        continue
                    candidates.append((full, score + _finite(row[c])))
            if last or not tainted:
                new_beams.append(heapq.nsmallest(keep, candidates, key=lambda t: (-t[1], t[0])))
            else:
                new_beams.append(_keep_untainted(candidates, keep, uid_prefix, tainted))
        beams = new_beams

    wanted = list(dict.fromkeys(make_uid(uid_prefix, c) for beam in beams for c, _ in beam))
    transports = directory.resolve(wanted) if wanted else {}
    chosen_uids: list[list[str]] = []
    chosen_coords: list[list[tuple[int, ...]]] = []
    for beam in beams:
        uids, coords = [], []
        for c, _ in beam:  # already sorted best first
            uid = make_uid(uid_prefix, c)
            if uid in transports:
                uids.append(uid)
                coords.append(c)
                if len(uids) == k_best:
                    break
        chosen_uids.append(uids)
        chosen_coords.append(coords)
    used = {uid for uids in chosen_uids for uid in uids}
    return BeamSearchResult(
        uids=chosen_uids,
        coords=chosen_coords,
        transports={uid: t for uid, t in transports.items() if uid in used},
    )

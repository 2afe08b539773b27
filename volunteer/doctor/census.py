"""Read every record of an experiment's grid from the DHT, one lookup per parent prefix.

``read_grid(registry, prefix, dims)`` runs inside trio (a ``ClientNode``'s loop or the
doctor's probe) and returns a ``Census``: uid -> the live verified entries that list it
(``ExpertRegistry.lookup`` drops forged, expired and out-of-bounds entries), the prefixes
whose lookup did not answer in time, and whether the grid was larger than
``MAX_LOOKUPS`` parent prefixes (then only the first ones are read, and the census says so).
Each lookup has its own deadline, so one slow DHT peer leaves a hole, not a hang.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from volunteer.net.records import ServerEntry

MAX_LOOKUPS = 1024
LOOKUPS_AT_ONCE = 16
LOOKUP_TIMEOUT_S = 8.0


@dataclass
class Census:
    """What the DHT holds for one grid (see module docstring)."""

    prefix: str
    dims: tuple[int, ...]
    entries: dict[str, list[ServerEntry]] = field(default_factory=dict)
    unanswered: list[str] = field(default_factory=list)
    truncated: bool = False

    @property
    def uids(self) -> list[str]:
        return list(self.entries)


def parent_prefixes(prefix: str, dims: Sequence[int]) -> list[tuple[str, list[str]]]:
    """(parent prefix query, [uid, ...]) for the whole grid, row-major; at most MAX_LOOKUPS."""
    out: list[tuple[str, list[str]]] = []
    *outer, last = dims
    for coords in itertools.product(*(range(d) for d in outer)):
        parent = ".".join([prefix, *map(str, coords)]) + "."
        out.append((parent, [f"{parent}{c}" for c in range(last)]))
        if len(out) >= MAX_LOOKUPS:
            break
    return out


def grid_lookups(prefix: str, dims: Sequence[int]) -> int:
    """How many parent prefixes the full grid has (before the MAX_LOOKUPS cap)."""
    total = 1
    for d in dims[:-1]:
        total *= d
    return total


async def read_grid(registry: Any, prefix: str, dims: Sequence[int],
                    timeout: float = LOOKUP_TIMEOUT_S) -> Census:
    """The census of the grid ``prefix`` x ``dims`` (``registry``: an ``ExpertRegistry``)."""
    if not dims:
        raise ValueError("a grid needs at least one dimension")
    census = Census(prefix, tuple(dims), truncated=grid_lookups(prefix, dims) > MAX_LOOKUPS)
    groups = parent_prefixes(prefix, dims)
    for _parent, uids in groups:
        for uid in uids:
            census.entries[uid] = []
    limiter = trio.CapacityLimiter(LOOKUPS_AT_ONCE)

    async def one(parent: str, uids: list[str]) -> None:
        async with limiter:
            found = None
            with trio.move_on_after(timeout):
                try:
                    found = await registry.lookup(parent)
                except Exception:  # a lookup that fails is a hole in the census, never a crash
                    found = None
        if found is None:
            census.unanswered.append(parent)
            return
        for uid in uids:
            child = uid.rsplit(".", 1)[1]
            census.entries[uid] = [e for e in found if child in e.children]

    async with trio.open_nursery() as nursery:
        for parent, uids in groups:
            nursery.start_soon(one, parent, uids)
    census.unanswered.sort()
    return census

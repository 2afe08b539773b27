"""The registry level of the swarm simulator: thousands of volunteers serving one grid.

``measure_grid(peers, seed, preset)`` runs the product's registry code (``sim_registry``:
real Ed25519 signing, validation, the fair capped merge, the prefix index, the reading rule
of ``ExpertRegistry.lookup``) with ``peers`` volunteers serving one grid, each hosting
``num_experts`` uids, and measures, for the current layout (sharded prefix keys,
``volunteer.net.key_shards``) and for the layout before it (one key per prefix,
``old_layout``):

(a) discoverability under capped keys: ``discoverable_servers_fraction`` (of all
    (server, hosted uid) pairs, the share a reader finds under the uid's parent prefix),
    ``root_children_listed_fraction`` (grid rows the root's lookup lists, of the rows
    served), ``hot_uid_servers_listed_fraction`` (of the servers of the most replicated uid,
    the share listed), ``max_writers_per_key`` and the "key_full" refusals;
(b) beam search per trainer step (``beam_cost``): ``beam_lookups_per_step``,
    ``beam_ms_per_step`` (with ``lookup_ms`` per DHT lookup), and how many distinct servers
    one trainer's choices reached (``beam_servers_chosen``);
(c) expert assignment (``coverage``, current layout only: it matters where keys are not
    full) on at most the preset's ``cover_peers`` volunteers and its ``cover_grid``:
    ``cover_empty_grid_min``, ``replicate_grid_min``, ``recover_after_20pct_leave_min``,
    ``rereplicate_after_20pct_leave_min``, ``rebalance_moves``, ``moves_after_cover``,
    ``moves_after_recover`` (see ``coverage``).

Which uids a volunteer hosts in (a) and (b): the product's offline choice
(``assignment.choose_experts``, a hash of (peer id, uid)), which is what ``plan_assignment``
converges to once every uid is above its replication target and loads are equal.
Everything is reproducible from ``seed``.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from volunteer.experts.assignment import choose_experts
from volunteer.net import records
from volunteer.sim.beam_cost import beam_cost
from volunteer.sim.coverage import CoverageResult, measure_coverage
from volunteer.sim.sim_registry import SimRegistry, SimWriter

UID_PREFIX = "sim.ffn"
LOOKUP_MS = 250.0
"""One DHT lookup's latency when the caller passes none (the DHT level measures the real
p50 for each swarm size; ``scripts/simulate_swarm.py`` passes it)."""


@dataclass(frozen=True)
class GridPreset:
    """Sizes of one preset: the grid, what each volunteer hosts, the beam search, coverage."""

    grid: tuple[int, ...]
    num_experts: int = 4
    beam_steps: int = 3
    batch: int = 16
    beam_size: int = 4
    k_best: int = 4
    cover_grid: tuple[int, ...] = (8, 8)
    cover_peers: int = 64
    replication: int = 2
    rebalance_interval_s: float = 60.0


PRESETS = {
    "smoke": GridPreset(grid=(8, 8), beam_steps=2, batch=4, cover_grid=(4, 4), cover_peers=16),
    "default": GridPreset(grid=(32, 32), cover_grid=(16, 16), cover_peers=200),
    "full": GridPreset(grid=(32, 32), beam_steps=5, cover_grid=(16, 32), cover_peers=320),
}


def grid_uids(grid: tuple[int, ...], prefix: str = UID_PREFIX) -> list[str]:
    """Every uid of a grid, ``prefix.i.j...``."""
    uids = [prefix]
    for size in grid:
        uids = [f"{u}.{c}" for u in uids for c in range(size)]
    return uids


def discoverability(reg: SimRegistry, hosting: dict[str, list[str]], now: float) -> dict[str, Any]:
    """Figures (a) for one registry into which every volunteer of ``hosting`` announced."""
    by_parent: dict[str, set[tuple[str, str]]] = {}
    servers_of: Counter[str] = Counter()
    for pid, uids in hosting.items():
        for uid in uids:
            prefix, child = records.parent_pair(uid)
            by_parent.setdefault(prefix, set()).add((pid, child))
            servers_of[uid] += 1
    listed: set[tuple[str, str, str]] = set()
    for prefix in by_parent:
        for e in reg.lookup(prefix, now):
            listed.update((prefix, e.peer_id, c) for c in e.children)
    pairs = sum(len(s) for s in by_parent.values())
    found = sum(1 for p, s in by_parent.items() for pid, c in s if (p, pid, c) in listed)
    hot_uid, hot_n = servers_of.most_common(1)[0] if servers_of else ("", 0)
    hot_prefix, hot_child = records.parent_pair(hot_uid) if hot_uid else ("", "")
    hot_listed = sum(1 for pid, c in by_parent.get(hot_prefix, ()) if c == hot_child
                     and (hot_prefix, pid, c) in listed)
    root = UID_PREFIX + "."
    rows = {records.index_pairs(u)[0][1] for uids in hosting.values() for u in uids}
    root_listed = {c for e in reg.lookup(root, now) if e.state == "serving" for c in e.children}
    writers: Counter[str] = Counter()
    for uids in hosting.values():
        for prefix in {p for u in uids for p, _c in records.index_pairs(u)}:
            writers[prefix] += 1
    return {
        "discoverable_servers_fraction": found / pairs if pairs else 1.0,
        "root_children_listed_fraction": len(rows & root_listed) / len(rows) if rows else 1.0,
        "hot_uid_servers_listed_fraction": hot_listed / hot_n if hot_n else 1.0,
        "hot_uid_servers": hot_n,
        "max_writers_per_key": max(writers.values(), default=0),
        "key_full_refusals": reg.stats.get("key_full"),
        "other_drops": reg.stats.total() - reg.stats.get("key_full"),
    }


def _layout(writers: list[SimWriter], hosting: dict[str, list[str]], sharded: bool,
            p: GridPreset, seed: int, lookup_ms: float) -> dict[str, Any]:
    # Entries are read by DhtDirectory, which checks expiry against the wall clock: the
    # simulated announces happen "now", one millisecond apart, with the longest TTL an
    # experiment may set, so none expires while a big swarm is still being announced.
    reg = SimRegistry("sim", sharded=sharded, signed=True, seed=seed, ttl=records.MAX_TTL)
    t0 = time.perf_counter()
    base = time.time()
    for i, w in enumerate(writers):
        reg.announce(w, hosting[w.peer_id], now=base + i * 1e-3, free=0)
    announce_s = time.perf_counter() - t0
    now = base + len(writers) * 1e-3
    out = discoverability(reg, hosting, now)
    out.update(beam_cost(reg, p.grid, UID_PREFIX, steps=p.beam_steps, batch=p.batch,
                         beam_size=p.beam_size, k_best=p.k_best, lookup_ms=lookup_ms, seed=seed,
                         now=now))
    out["puts"] = reg.puts
    out["announce_cpu_s"] = round(announce_s, 3)
    return out


@functools.lru_cache(maxsize=8)
def _coverage(volunteers: int, p: GridPreset, seed: int) -> CoverageResult:
    """Coverage runs are the same for every swarm size above ``cover_peers``: run once."""
    return measure_coverage(volunteers, grid_uids(p.cover_grid), seed, capacity=p.num_experts,
                            replication=p.replication, rebalance_interval_s=p.rebalance_interval_s)


def measure_grid(peers: int, seed: int, preset: str = "smoke", *, lookup_ms: float | None = None,
                 coverage: bool = True, old_layout: bool = True) -> dict[str, Any]:
    """Figures (a), (b), (c) of the module docstring for ``peers`` volunteers.

    The top-level figures are the current product's (sharded keys); ``old_layout`` holds
    (a) and (b) for one key per prefix, with the same volunteers and the same uids.
    ``lookup_ms``: one DHT lookup's latency (default ``LOOKUP_MS``).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}")
    if peers < 1:
        raise ValueError("peers must be at least 1")
    p = PRESETS[preset]
    lookup_ms = LOOKUP_MS if lookup_ms is None else float(lookup_ms)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    writers = [SimWriter.make(rng, signed=True) for _ in range(peers)]
    uids = grid_uids(p.grid)
    hosting = {w.peer_id: sorted(choose_experts(uids, p.num_experts, w.peer_id)) for w in writers}
    out: dict[str, Any] = {"peers": peers, "grid": "x".join(map(str, p.grid)),
                           "num_experts": p.num_experts, "layout": "sharded",
                           "lookup_ms": lookup_ms}
    out.update(_layout(writers, hosting, True, p, seed, lookup_ms))
    if old_layout:
        out["old_layout"] = _layout(writers, hosting, False, p, seed, lookup_ms)
    if coverage:
        n = min(peers, p.cover_peers)
        cov = _coverage(n, p, seed)
        out.update({
            "cover_peers": n, "cover_grid": "x".join(map(str, p.cover_grid)),
            "cover_empty_grid_min": cov.cover_empty_grid_min,
            "replicate_grid_min": cov.replicate_grid_min,
            "recover_after_20pct_leave_min": cov.recover_after_leave_min,
            "rereplicate_after_20pct_leave_min": cov.rereplicate_after_leave_min,
            "rebalance_moves": cov.rebalance_moves,
            "moves_after_cover": cov.moves_after_cover,
            "moves_after_recover": cov.moves_after_recover,
        })
    out["cpu_s"] = round(time.perf_counter() - t0, 2)
    return out


BEAM_GRIDS = {"smoke": ((4, 4), (8, 8)), "default": ((8, 8), (16, 16), (32, 32)),
              "full": ((8, 8), (16, 16), (32, 32), (64, 64))}
"""The grids ``beam_by_grid`` sweeps per preset."""


def beam_by_grid(peers: int, seed: int, preset: str = "smoke", *,
                 lookup_ms: float | None = None) -> list[dict[str, Any]]:
    """A trainer's cold beam-search step against ``peers`` volunteers (current layout) for
    each grid of ``BEAM_GRIDS[preset]``: lookups, rounds, ms and KiB per step, and how many
    of the servers stay discoverable. The same volunteers (seeded) host ``num_experts`` each."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    lookup_ms = LOOKUP_MS if lookup_ms is None else float(lookup_ms)
    out = []
    for grid in BEAM_GRIDS[preset]:
        rng = random.Random(seed)
        writers = [SimWriter.make(rng, signed=True) for _ in range(peers)]
        uids = grid_uids(grid)
        hosting = {w.peer_id: sorted(choose_experts(uids, p.num_experts, w.peer_id)) for w in writers}
        fig = _layout(writers, hosting, True, dataclasses.replace(p, grid=grid), seed, lookup_ms)
        out.append({"grid": "x".join(map(str, grid)), "grid_uids": len(uids), "peers": peers,
                    **{k: fig[k] for k in ("beam_lookups_per_step", "beam_rounds_per_step",
                                           "beam_ms_per_step", "beam_kib_per_step",
                                           "discoverable_servers_fraction") if k in fig}})
    return out

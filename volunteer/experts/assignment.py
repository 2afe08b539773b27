"""Which experts of the grid this node hosts: pure functions, kept apart from the daemon.

``choose_experts`` (offline, no view of the swarm) ranks the grid:

1. uids this node already has checkpoints for (matching the manifest) come first, so a
   restart resumes the same experts and their training is never thrown away;
2. then uids nobody else is known to host (``taken``, filled by the network service later);
3. ties are broken by a hash of ``(node seed, uid)``, so different nodes spread over the grid
   instead of all picking ``prefix.0.0`` first, and the same node picks the same uids again.

``plan_assignment`` (Petals-style) decides from the swarm's view (what the DHT says):

- The view is untrusted. Entries of this node (``peer_id == me``), uids outside the grid and
  holders that are not ``"serving"`` (e.g. ``"draining"``, i.e. leaving) are ignored; a peer
  listed twice counts once (its highest load); loads are clamped to [0, 1], anything
  non-numeric or non-finite reads as 1.0. ``version`` is informational and not used.
  ``replicas(u)`` below is the number of *other* peers serving ``u``.
- Fresh choice: fill ``min(capacity, grid size)`` slots, best first: unserved uids (0 replicas),
  then uids below ``replication`` (fewest replicas first), then the rest, most loaded (mean load
  of their replicas) first. Ties: uids with a checkpoint here first (resume trained weights),
  then a hash of ``(me, uid)`` so different nodes spread over the grid.
- Rebalance: every hosted uid is kept by default (hysteresis: a node that moves throws away
  training and a warm cache, so noise must never make it move). Hosted uids outside the grid
  are dropped; beyond capacity the least needed (the end of the order above) are dropped.
  Free slots are filled as in the fresh choice. A hosted uid ``h`` is swapped for ``t`` only
  when that clearly helps the swarm:

  * coverage: ``replicas(h) >= replication`` and ``replicas(t) < replication`` (best ``t`` by
    the order above, so unserved first), or
  * load (only when no coverage swap applies): ``replicas(h) >= 2``, ``t`` is served and every
    replica of ``t`` is more loaded than the mean load of ``h``'s replicas by > ``load_margin``;
  * and in both cases this node is an *excess* holder of ``h``: rank all serving holders of
    ``h``, this node included, by a hash of ``(peer_id, h)``; only those ranked at
    ``replication`` or beyond may leave. Every node computes the same ranking, so the top
    ``replication`` holders stay put: nodes moving at once never take ``h`` below target, and a
    node that moved is not pulled back by the next round.

  A uid this node alone serves is never dropped except over capacity. Swaps repeat until none
  applies. Each one raises (hosted uids below target, sum of hosted uids' mean loads)
  lexicographically, so this ends, and the plan is stable: planning again on the view that
  results from applying it (this node's own entries are ignored anyway) adds and drops nothing.
  Across nodes, loads follow holders (a move cools ``t`` and warms ``h``): ``load_margin`` must
  exceed that effect plus noise, or two nodes can trade places forever; the 0.5 default does.

``choose_adopter`` names the peer that should take over a uid this node leaves: peers with a
free slot that do not serve it yet, least loaded, then most free slots, then a hash of
``(peer_id, uid)``; if none has a free slot, the least loaded one not serving it; else None.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

MAX_FREE_SLOTS = 4096


def choose_experts(
    grid_uids: Iterable[str],
    count: int,
    seed: str,
    checkpointed: Collection[str] = (),
    taken: Collection[str] = (),
) -> list[str]:
    """Return up to ``count`` uids of the grid to host, best first (see the module rules)."""
    if count < 0:
        raise ValueError("count must be non-negative")
    uids = list(dict.fromkeys(grid_uids))
    checkpointed_set = set(checkpointed)
    taken_set = set(taken)

    def rank(uid: str) -> tuple[int, int, str]:
        digest = hashlib.sha256(f"{seed}\x00{uid}".encode()).hexdigest()
        return (0 if uid in checkpointed_set else 1, 1 if uid in taken_set else 0, digest)

    return sorted(uids, key=rank)[:count]


@dataclass(frozen=True)
class Holder:
    """One live peer's announcement that it serves (or holds, while draining) a uid."""

    peer_id: str
    load: float = 0.0  # 0..1 queue fill it reports
    version: int = 0  # updates applied of the shard it can serve
    state: str = "serving"  # "serving" | "draining"


@dataclass(frozen=True)
class PeerSlots:
    """What a peer says about its room: free expert slots (clamped to [0, 4096]) and load (to [0, 1])."""

    free: int
    load: float = 0.0


@dataclass(frozen=True)
class Plan:
    """The outcome of ``plan_assignment``."""

    host: tuple[str, ...]  # the uids to host after this plan, best first
    add: tuple[str, ...]  # uids to start hosting (not in `hosted`)
    drop: tuple[str, ...]  # uids of `hosted` to stop hosting
    reasons: Mapping[str, str]  # uid -> one short human reason, for every uid in host and drop


def _hash(a: str, b: str) -> str:
    return hashlib.sha256(f"{a}\x00{b}".encode()).hexdigest()


def _load(value: object) -> float:
    """An untrusted load: clamped to [0, 1]; non-numeric or non-finite -> 1.0 (assume busy)."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return 1.0
    return min(1.0, max(0.0, x)) if math.isfinite(x) else 1.0


def _free(value: object) -> int:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return 0
    return int(min(MAX_FREE_SLOTS, max(0.0, x))) if math.isfinite(x) else 0


def _serving(view: Mapping[str, Sequence[Holder]], uids: Iterable[str], me: str) -> dict[str, dict[str, float]]:
    """uid -> {peer_id: load} of the other peers serving it, for the given uids only."""
    out: dict[str, dict[str, float]] = {uid: {} for uid in uids}
    try:
        items = list(view.items())
    except (AttributeError, TypeError):
        return out
    for uid, holders in items:
        if not isinstance(uid, str) or uid not in out or isinstance(holders, (str, bytes)):
            continue
        try:
            entries = list(holders)
        except TypeError:
            continue
        peers = out[uid]
        for h in entries:
            peer = getattr(h, "peer_id", None)
            if not isinstance(peer, str) or not peer or peer == me or getattr(h, "state", None) != "serving":
                continue
            load = _load(getattr(h, "load", 1.0))
            peers[peer] = max(load, peers.get(peer, 0.0))
    return out


def _replicas_text(k: int) -> str:
    return "sole holder" if k == 0 else f"{k} other replica{'s' if k != 1 else ''}"


def plan_assignment(
    grid_uids: Iterable[str],
    capacity: int,
    me: str,
    view: Mapping[str, Sequence[Holder]],
    hosted: Collection[str] = (),
    checkpointed: Collection[str] = (),
    replication: int = 2,
    load_margin: float = 0.5,
) -> Plan:
    """Which uids this node should host given the swarm's ``view`` (see the module rules)."""
    if capacity < 0:
        raise ValueError("capacity must be non-negative")
    if replication < 1:
        raise ValueError("replication must be at least 1")
    if not (math.isfinite(load_margin) and load_margin >= 0):
        raise ValueError("load_margin must be finite and non-negative")
    grid = list(dict.fromkeys(grid_uids))
    others = _serving(view, grid, me)
    ckpt = set(checkpointed)
    n = {u: len(p) for u, p in others.items()}
    mean = {u: (sum(p.values()) / len(p) if p else 0.0) for u, p in others.items()}
    low = {u: min(p.values(), default=0.0) for u, p in others.items()}
    tie = {u: _hash(me, u) for u in grid}
    may_leave: dict[str, bool] = {}

    def key(u: str) -> tuple[int, int, float, bool, str]:
        k = n[u]
        if k == 0:
            return (0, 0, 0.0, u not in ckpt, tie[u])
        if k < replication:
            return (1, k, 0.0, u not in ckpt, tie[u])
        return (2, 0, -mean[u], u not in ckpt, tie[u])

    def need(u: str) -> str:
        k = n[u]
        if k == 0:
            return "unserved"
        if k < replication:
            return f"{k} of {replication} replicas"
        return f"most loaded ({mean[u]:.2f})"

    def excess(u: str) -> bool:
        """Rule (c): this node ranks at ``replication`` or beyond among all serving holders of u."""
        if u not in may_leave:
            mine = _hash(me, u)
            may_leave[u] = sum(_hash(p, u) < mine for p in others[u]) >= replication
        return may_leave[u]

    original = list(dict.fromkeys(hosted))
    why_in: dict[str, str] = {}
    why_out: dict[str, str] = {u: "not in the grid" for u in original if u not in others}
    kept = sorted((u for u in original if u in others), key=key)
    cap = min(capacity, len(grid))
    for u in kept[cap:]:
        why_out[u] = f"over capacity ({_replicas_text(n[u])})"
    held = set(kept[:cap])
    for u in sorted((u for u in grid if u not in held), key=key)[: cap - len(held)]:
        held.add(u)
        why_in[u] = f"resume checkpoint ({need(u)})" if u in ckpt else need(u)

    # Each swap raises (hosted uids below target, sum of their mean loads): the bound is only a guard.
    for _ in range((cap + 1) * (len(grid) + 1)):
        leavers = [u for u in held if n[u] >= replication and excess(u)]
        if not leavers:
            break
        h = max(leavers, key=key)
        t = min((u for u in grid if u not in held and n[u] < replication), key=key, default=None)
        if t is not None:
            why_out[h] = f"over-covered ({_replicas_text(n[h])}) -> moved to {t} ({need(t)})"
            why_in[t] = f"{need(t)}, replaces {h}"
        else:
            movers = [u for u in leavers if n[u] >= 2]
            if not movers:
                break
            h = min(movers, key=lambda u: (mean[u], tie[u]))
            hot = [u for u in grid if u not in held and n[u] > 0 and low[u] - mean[h] > load_margin]
            t = min(hot, key=key, default=None)
            if t is None:
                break
            why_out[h] = f"less loaded ({mean[h]:.2f}) -> moved to {t} (replicas at >= {low[t]:.2f})"
            why_in[t] = f"hot (replicas at >= {low[t]:.2f}), replaces {h}"
        held.remove(h)
        held.add(t)

    original_set = set(original)
    host = tuple(sorted(held, key=key))
    add = tuple(u for u in host if u not in original_set)
    drop = tuple(u for u in original if u not in held)
    reasons = {u: why_in[u] if u in add else f"keep ({_replicas_text(n[u])}, {need(u)})" for u in host}
    reasons.update((u, why_out[u]) for u in drop)
    return Plan(host=host, add=add, drop=drop, reasons=reasons)


def choose_adopter(
    uid: str, me: str, peers: Mapping[str, PeerSlots], view: Mapping[str, Sequence[Holder]]
) -> str | None:
    """The peer (not ``me``) that should take over ``uid`` when this node leaves (see the module rules)."""
    serving = _serving(view, [uid], me)[uid]
    try:
        items = list(peers.items())
    except (AttributeError, TypeError):
        return None
    slots: dict[str, tuple[int, float]] = {}
    for peer, s in items:
        if isinstance(peer, str) and peer and peer != me and peer not in serving:
            slots[peer] = (_free(getattr(s, "free", 0)), _load(getattr(s, "load", 1.0)))
    if not slots:
        return None
    roomy = [p for p, (free, _) in slots.items() if free > 0]
    if roomy:
        return min(roomy, key=lambda p: (slots[p][1], -slots[p][0], _hash(p, uid)))
    return min(slots, key=lambda p: (slots[p][1], _hash(p, uid)))

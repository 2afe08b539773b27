"""Which experts of the grid this node hosts: a pure function, kept apart from the daemon.

Rules, in order:

1. uids this node already has checkpoints for (matching the manifest) come first, so a
   restart resumes the same experts and their training is never thrown away;
2. then uids nobody else is known to host (``taken``, filled by the network service later);
3. ties are broken by a hash of ``(node seed, uid)``, so different nodes spread over the grid
   instead of all picking ``prefix.0.0`` first, and the same node picks the same uids again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable


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

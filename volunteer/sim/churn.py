"""The churn model: volunteers replaced at a steady rate, killed without a goodbye.

``ChurnModel(replace_per_hour=0.10)`` replaces that fraction of the swarm per hour of
virtual time: at evenly spread instants one live peer (chosen at random) vanishes without
telling anyone (its entries stay in others' routing tables; requests to it time out, as in
reality after a crash, a closed laptop or a lost Wi-Fi) and a new volunteer, with a fresh
id and a NAT type drawn like the others, joins through the bootstrap peers. The swarm size
stays N, the membership turns over. ``events`` yields the instants; the driver
(``dht_swarm``) acts on them in order, so a seed gives one sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ChurnModel:
    """Steady replacement of ``replace_per_hour`` of the swarm per virtual hour."""

    replace_per_hour: float = 0.10

    def interval_s(self, peers: int) -> float:
        """Seconds between two replacements in a swarm of ``peers``."""
        per_s = self.replace_per_hour * peers / 3600.0
        return float("inf") if per_s <= 0 else 1.0 / per_s

    def events(self, peers: int, start: float, duration_s: float) -> Iterator[float]:
        """Virtual instants of the replacements within ``[start, start + duration_s)``."""
        step = self.interval_s(peers)
        k = 0
        while (k + 0.5) * step < duration_s:  # offsets from ``start``: no rounding drift
            yield start + (k + 0.5) * step
            k += 1

    def leave_probability(self, seconds: float) -> float:
        """Chance that one given peer is replaced within ``seconds``."""
        return min(1.0, self.replace_per_hour * seconds / 3600.0)

"""Beam search per trainer step over a simulated registry: lookups, rounds and latency.

Runs the product's ``beam_search`` through the product's ``DhtDirectory`` (caching, server
choice, the children/resolve reads), backed by a stand-in ``ClientNode`` whose ``lookup``
reads a ``SimRegistry`` by ``ExpertRegistry.lookup``'s rule. Each step is *cold*: the
directory's cache is dropped first, so a step pays what a trainer pays once per cache period
(3 s by default). The trainer's first step is reported apart (``beam_first_step_ms``): it
is where its registry learns which prefixes are full (one more round for each); the others
are averaged. A step's latency is the sum, over the directory's batched lookups, of the
sequential rounds of the slowest prefix in the batch times ``lookup_ms`` (one DHT lookup's
latency: the script passes the DHT level's measured p50 for the same swarm size), and its
bytes are those of the signed entries the keys held, times ``dht_store.REPLICATION`` (a reader
asks that many DHT servers, each answering with the whole value).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from volunteer.client.beam_search import beam_search
from volunteer.client.dht_directory import DhtDirectory
from volunteer.net.dht_store import REPLICATION
from volunteer.net.records import ServerEntry
from volunteer.sim.sim_registry import ReadCost, SimRegistry


@dataclass
class SimClient:
    """The part of ``ClientNode`` that ``DhtDirectory`` uses, over a ``SimRegistry``."""

    registry: SimRegistry
    now: float = 0.0
    keys: int = 0
    rounds: int = 0
    entry_bytes: int = 0
    known_full: set[str] = field(default_factory=set)

    def lookup(self, prefixes: Sequence[str]) -> dict[str, list[ServerEntry]]:
        """Concurrent lookups: keys add up, rounds are those of the slowest prefix."""
        out, worst = {}, 0
        for p in dict.fromkeys(prefixes):
            cost = ReadCost()
            out[p] = self.registry.lookup(p, self.now, cost, self.known_full)
            self.keys += cost.keys
            self.entry_bytes += cost.entry_bytes
            worst = max(worst, cost.rounds)
        self.rounds += worst
        return out

    def transport(self, peer_id: str, addrs: Sequence[str] = ()) -> Any:
        return _NoTransport(peer_id)


class _NoTransport:
    """Stands in for a libp2p transport: the simulation never sends a request."""

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id

    def request(self, frames: Sequence[Any], timeout: float) -> list:
        raise NotImplementedError("the simulated trainer sends no requests")

    def close(self) -> None:
        pass


def beam_cost(registry: SimRegistry, grid: Sequence[int], uid_prefix: str, *, steps: int,
              batch: int, beam_size: int, k_best: int, lookup_ms: float, seed: int,
              now: float = 1.0) -> dict[str, float]:
    """Cold beam-search steps of one trainer: lookups, rounds, ms per step and the share of
    the swarm's servers its choices reached (``DhtDirectory.resolve`` picks one per uid)."""
    client = SimClient(registry, now)
    directory = DhtDirectory(client, cache_ttl=1e9, rng=random.Random(seed))  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    chosen: set[str] = set()
    first_rounds = 0
    for step in range(steps + 1):  # step 0 warms the reader's memory of full prefixes
        if step == 1:
            first_rounds = client.rounds
            client.keys = client.rounds = client.entry_bytes = 0
        directory.invalidate()
        scores = [torch.randn(batch, d, generator=gen) for d in grid]
        result = beam_search(scores, uid_prefix, directory, beam_size, k_best)
        chosen.update(t.peer_id for t in result.transports.values())
    return {
        "beam_first_step_ms": first_rounds * lookup_ms,
        "beam_lookups_per_step": client.keys / steps,
        "beam_rounds_per_step": client.rounds / steps,
        "beam_ms_per_step": client.rounds / steps * lookup_ms,
        "beam_servers_chosen": len(chosen),
        # every lookup asks REPLICATION DHT servers, each answering with the whole value
        "beam_kib_per_step": client.entry_bytes * REPLICATION / steps / 1024,
    }


"""Relay load: how many relays a swarm with the wild NAT mix needs, and what each carries.

The swarm's relays are its public volunteers (``network.public: auto`` turns on the HOP role
once a dial-back shows a node reachable). What a relay accepts is the product's own
``RelaySettings`` (``volunteer.net.nat.relay``: reservations, concurrent circuits, bytes and
duration per circuit) and how many reservations a NATed node holds is ``NatTraversal``'s
``max_reservations`` default; both are read from the modules, never copied.

``relay_plan`` draws, from ``seed``, which volunteers are behind NAT (``nat_fraction``,
about 91% of IPFS peers) and which of those a hole punch fails for (``1 - punch_success``;
about 70% of punches succeed in the wild), so that they stay relayed. Every NATed volunteer
reserves slots on ``max_reservations`` relays drawn at random among the public volunteers
that still have a free slot (as ``NatTraversal`` takes the relays it finds); a permanently
relayed volunteer carries its trainer traffic (``trainer_bytes_per_s``, both directions) over
``circuits_per_volunteer`` circuits through one of its relays. Figures:

- ``relayed_fraction``: volunteers that stay relayed; ``public_nodes``;
- ``relays_needed``: the most of what reservations, circuits and bandwidth
  (``relay_capacity`` bytes/s each relay may forward) ask for, spread evenly;
- ``relay_mbps_each`` (mean over relays carrying traffic) and ``relay_mbps_max`` with the
  random placement; ``relays_over_circuit_limit``; ``reservations_refused`` (no public node
  had a free slot);
- ``circuit_cap_bytes_per_s``: what one circuit may carry on average before its byte limit
  ends it early (``circuit_bytes / circuit_duration_s``), and
  ``relayed_volunteer_cap_bytes_per_s``: what a relayed volunteer's circuits carry at most,
  so ``relayed_traffic_capped`` says whether its trainers would need more than that.
"""

from __future__ import annotations

import inspect
import math
import random
from collections import Counter
from typing import Any

from volunteer.net.nat.relay import RelaySettings
from volunteer.net.nat.traversal import NatTraversal

NAT_FRACTION = 0.91
PUNCH_SUCCESS = 0.70
RELAY_CAPACITY = 100e6 / 8  # bytes/s a relay forwards: a 100 Mbit/s uplink
TRAINER_BYTES_PER_S = 2e6  # per volunteer, both directions: 4 experts, ~0.5 MB/s each
CIRCUITS_PER_VOLUNTEER = 4  # trainers talking to one relayed volunteer at once


def reservations_per_node() -> int:
    """How many relays a NATed node reserves a slot on (``NatTraversal``'s default)."""
    return int(inspect.signature(NatTraversal.__init__).parameters["max_reservations"].default)


def relay_plan(peers: int, seed: int, nat_fraction: float = NAT_FRACTION,
               punch_success: float = PUNCH_SUCCESS, relay_capacity: float = RELAY_CAPACITY,
               trainer_bytes_per_s: float = TRAINER_BYTES_PER_S,
               circuits_per_volunteer: int = CIRCUITS_PER_VOLUNTEER,
               settings: RelaySettings | None = None) -> dict[str, Any]:
    """Relay figures for ``peers`` volunteers (see module docstring)."""
    if peers < 1:
        raise ValueError("peers must be at least 1")
    if not (0 <= nat_fraction <= 1 and 0 <= punch_success <= 1):
        raise ValueError("nat_fraction and punch_success are fractions in [0, 1]")
    if relay_capacity <= 0 or trainer_bytes_per_s < 0 or circuits_per_volunteer < 1:
        raise ValueError("relay_capacity > 0, trainer_bytes_per_s >= 0, circuits >= 1")
    s = settings or RelaySettings()
    per_node = reservations_per_node()
    rng = random.Random(seed)
    nated = [rng.random() < nat_fraction for _ in range(peers)]
    relayed = [n and rng.random() >= punch_success for n in nated]
    public = [i for i in range(peers) if not nated[i]]
    n_nat, n_relayed = sum(nated), sum(relayed)
    traffic = n_relayed * trainer_bytes_per_s

    reservations: Counter[int] = Counter()
    circuits: Counter[int] = Counter()
    forwarded: Counter[int] = Counter()
    refused = 0
    open_relays = list(public)
    for i in range(peers):
        if not nated[i]:
            continue
        mine: list[int] = []
        for _ in range(per_node):
            choices = [r for r in open_relays if r not in mine]
            if not choices:
                refused += 1
                continue
            r = rng.choice(choices)
            mine.append(r)
            reservations[r] += 1
            if reservations[r] >= s.max_reservations:
                open_relays.remove(r)
        if relayed[i] and mine:
            for _ in range(circuits_per_volunteer):
                r = rng.choice(mine)
                circuits[r] += 1
                forwarded[r] += trainer_bytes_per_s / circuits_per_volunteer

    need_res = math.ceil(n_nat * per_node / s.max_reservations)
    need_circ = math.ceil(n_relayed * circuits_per_volunteer / s.max_circuits)
    need_bw = math.ceil(traffic / relay_capacity)
    needed = max(need_res, need_circ, need_bw, 1 if n_nat else 0)
    carrying = [b for b in forwarded.values() if b > 0]
    circuit_cap = s.circuit_bytes / s.circuit_duration_s
    volunteer_cap = circuit_cap * circuits_per_volunteer
    return {
        "peers": peers,
        "nat_fraction": sum(nated) / peers,
        "relayed_fraction": n_relayed / peers,
        "public_nodes": len(public),
        "relays_needed": needed,
        "relays_needed_for": {"reservations": need_res, "circuits": need_circ,
                              "bandwidth": need_bw},
        "relays_fit_in_public_nodes": needed <= len(public),
        "relay_mbps_each": (traffic / needed * 8 / 1e6) if needed else 0.0,
        "relay_mbps_mean_placed": (sum(carrying) / len(carrying) * 8 / 1e6) if carrying else 0.0,
        "relay_mbps_max_placed": max(carrying, default=0.0) * 8 / 1e6,
        "relays_carrying_traffic": len(carrying),
        "relays_over_circuit_limit": sum(1 for c in circuits.values() if c > s.max_circuits),
        "relays_over_capacity": sum(1 for b in carrying if b > relay_capacity),
        "reservations_refused": refused,
        "reservations_per_nated_node": per_node,
        "relay_limits": {"max_reservations": s.max_reservations, "max_circuits": s.max_circuits,
                         "circuit_bytes": s.circuit_bytes,
                         "circuit_duration_s": s.circuit_duration_s},
        "trainer_bytes_per_s": trainer_bytes_per_s,
        "relay_traffic_mbps_total": traffic * 8 / 1e6,
        "circuit_cap_bytes_per_s": circuit_cap,
        "relayed_volunteer_cap_bytes_per_s": volunteer_cap,
        "relayed_traffic_capped": trainer_bytes_per_s > volunteer_cap,
    }

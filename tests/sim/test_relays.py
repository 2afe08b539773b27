"""Relay load of a swarm with the wild NAT mix: reproducible, hand-computed small cases, and
the product's relay limits read from the modules."""

from __future__ import annotations

import math

import pytest

from volunteer.net.nat.relay import RelaySettings
from volunteer.sim.relays import relay_plan, reservations_per_node


def test_reproducible_from_the_seed():
    assert relay_plan(500, seed=4) == relay_plan(500, seed=4)
    assert relay_plan(500, seed=4) != relay_plan(500, seed=5)


def test_no_nat_needs_no_relay():
    out = relay_plan(50, seed=1, nat_fraction=0.0)
    assert out["relayed_fraction"] == 0.0 and out["relays_needed"] == 0
    assert out["public_nodes"] == 50 and out["relay_mbps_each"] == 0.0


def test_all_nated_and_no_punch_lands_leaves_nobody_to_relay():
    out = relay_plan(20, seed=1, nat_fraction=1.0, punch_success=0.0)
    assert out["relayed_fraction"] == 1.0 and out["public_nodes"] == 0
    assert out["reservations_refused"] == 20 * reservations_per_node()
    assert not out["relays_fit_in_public_nodes"]


def test_needs_follow_the_product_limits():
    s = RelaySettings()
    out = relay_plan(2000, seed=3, trainer_bytes_per_s=1e6, relay_capacity=50e6)
    nat = round(out["nat_fraction"] * 2000)
    relayed = round(out["relayed_fraction"] * 2000)
    need = out["relays_needed_for"]
    assert need["reservations"] == math.ceil(nat * reservations_per_node() / s.max_reservations)
    assert need["circuits"] == math.ceil(relayed * 4 / s.max_circuits)
    assert need["bandwidth"] == math.ceil(relayed * 1e6 / 50e6)
    assert out["relays_needed"] == max(need.values())
    assert out["relay_mbps_each"] == pytest.approx(relayed * 1e6 / out["relays_needed"] * 8 / 1e6)
    assert out["circuit_cap_bytes_per_s"] == pytest.approx(s.circuit_bytes / s.circuit_duration_s)
    # roughly a third of the NATed volunteers stay relayed with the wild punch rate
    assert 0.2 < out["relayed_fraction"] < 0.35


def test_relayed_traffic_cap_is_the_circuit_budget():
    s = RelaySettings()
    cap = s.circuit_bytes / s.circuit_duration_s * 4
    assert not relay_plan(100, seed=1, trainer_bytes_per_s=cap * 0.9)["relayed_traffic_capped"]
    assert relay_plan(100, seed=1, trainer_bytes_per_s=cap * 1.1)["relayed_traffic_capped"]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        relay_plan(0, seed=1)
    with pytest.raises(ValueError):
        relay_plan(10, seed=1, nat_fraction=1.5)

"""The DHT level of the swarm simulator on its own: ordering, failures, reproducibility.

``SimNetwork.closest`` must order peers exactly as py-libp2p's routing table does; a peer
killed without a goodbye must cost the asker a timeout and leave its table; the figures of
``measure_dht`` must come from the seed alone (same seed: same row; another seed: another).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from libp2p.peer.peerinfo import PeerInfo

from volunteer.net.dht_routing import QUERY_TIMEOUT
from volunteer.sim.churn import ChurnModel
from volunteer.sim.clock import run_virtual
from volunteer.sim.dht_swarm import SwarmSpec, measure_dht
from volunteer.sim.transport import LinkModel, SimNetwork

pytestmark = pytest.mark.timeout(120)

SMALL = SwarmSpec(peers=60, lookups=8, churn_lookups=8, churn_hours=0.25)


def test_closest_orders_like_the_routing_table():
    async def main():
        net = SimNetwork(seed=3)
        peers = [net.new_peer(public=True) for _ in range(120)]
        rt = peers[0].rt
        for p in peers[1:]:
            await rt.add_peer(PeerInfo(p.peer_id, []))
        rng = random.Random(5)
        for _ in range(20):
            key = rng.randbytes(43)
            assert net.closest(key, rt.get_peer_ids(), 20) == rt.find_local_closest_peers(key, 20)
        assert rt.size() == 119 and len(rt.buckets) > 1  # the real table split its buckets

    run_virtual(main)


def test_a_killed_peer_costs_a_timeout_and_leaves_the_table():
    async def main():
        net = SimNetwork(seed=1, links=LinkModel(query_loss=0.0))
        a, b, c = (net.new_peer(public=True) for _ in range(3))
        for p in (a, b, c):
            p.server = True
        await a.rt.add_peer(PeerInfo(b.peer_id, []))
        await a.rt.add_peer(PeerInfo(c.peer_id, []))
        net.kill(c)
        trace = await net.lookup(a, b"/volunteer/key", serial=net.next_serial())
        assert trace.peers == [b.peer_id]
        assert trace.timeouts == 1 and trace.seconds >= QUERY_TIMEOUT
        assert not a.rt.peer_in_table(c.peer_id) and a.rt.peer_in_table(b.peer_id)
        assert b.rt.peer_in_table(a.peer_id)  # a server that asked joins the answerer's table
        return trace

    run_virtual(main)


def test_nated_peers_are_dht_clients_and_never_listed():
    async def main():
        net = SimNetwork(seed=2)
        boot = net.new_peer(public=True)
        boot.server = True
        client = net.new_peer(public=False)
        await client.rt.add_peer(PeerInfo(boot.peer_id, []))
        await net.lookup(client, client.peer_id.to_bytes(), serial=net.next_serial())
        assert not boot.rt.peer_in_table(client.peer_id)

    run_virtual(main)


def test_churn_replaces_the_given_fraction_per_hour():
    model = ChurnModel(replace_per_hour=0.1)
    assert len(list(model.events(1000, 0.0, 3600.0))) == 100
    assert model.leave_probability(3600.0) == pytest.approx(0.1)


def test_same_seed_same_figures_other_seed_other_figures():
    one = measure_dht(SMALL, seed=7)
    again = measure_dht(SMALL, seed=7)
    other = measure_dht(SMALL, seed=8)
    assert one == again
    assert one != other
    assert one["peers"] == 60 and one["dht_servers"] >= SMALL.bootstrap
    assert 0.0 <= one["lookup_success"] <= 1.0 and one["lookup_hops_p50"] >= 1
    assert one["churn_replaced"] == len(list(SMALL.churn.events(60, 0.0, 900.0)))


def test_the_product_never_imports_the_simulator():
    pkg = Path(__file__).resolve().parents[2] / "volunteer"
    pattern = re.compile(r"^\s*(from|import)\s+volunteer\.sim\b", re.M)
    offenders = [str(p.relative_to(pkg)) for p in pkg.rglob("*.py")
                 if "sim" not in p.relative_to(pkg).parts[:1] and pattern.search(p.read_text())]
    assert offenders == []

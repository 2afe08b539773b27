"""The simulator's transport against the real one: same swarm, same lookups, same results.

Ten real py-libp2p hosts (``SwarmNode`` with ``RegistryDHT``, DHT servers on loopback) get
sparse routing tables (each keeps five ring neighbours, so lookups need several hops), one
of them is killed, and the product's ``closest_peers`` runs a few lookups over real streams.
The simulator gets the same ids and the same table contents (the killed peer marked gone)
and runs the same lookups with ``SimNetwork.lookup`` (``table_lookup`` over simulated
FIND_NODE). The result lists must be equal, lookup by lookup, in order.
"""

from __future__ import annotations

import pytest
import trio
from libp2p.peer.peerinfo import PeerInfo

from tests.net.swarm_helpers import swarm, wait_for
from volunteer.net import libp2p_adapter as lp
from volunteer.net import records
from volunteer.net.dht_routing import closest_peers
from volunteer.sim.clock import run_virtual
from volunteer.sim.transport import LinkModel, SimNetwork

pytestmark = pytest.mark.timeout(120)

N = 10
KEEP = 5  # ring neighbours kept in each table: >= COUNT, so no lookup falls back to connections
COUNT = 4
KILLED = 7
CASES = [(src, records.dht_key("simtest", f"k{i}.").encode())
         for i, src in enumerate((1, 2, 3, 4, 5, 6, 8, 9))]


async def _settled(nodes) -> None:
    """Wait until no inbound peer waits for identify before joining a table."""
    await wait_for(lambda: not any(getattr(n.dht, "_pending_checks", None) for n in nodes))


async def _real(tmp_path):
    async with swarm(tmp_path, N) as nodes:
        ids = [n.peer_id for n in nodes]
        for i, node in enumerate(nodes):
            rt = lp.routing_table(node.dht)
            keep = [ids[(i + j) % N] for j in range(1, KEEP + 1)]
            for p in rt.get_peer_ids():
                if p not in keep:
                    rt.remove_peer(p)
            for j, p in ((j, ids[(i + j) % N]) for j in range(1, KEEP + 1)):
                addrs = nodes[(i + j) % N].host.get_addrs()
                node.host.get_peerstore().add_addrs(p, addrs, 3600)
                await rt.add_peer(PeerInfo(p, addrs))
        nodes[KILLED].kill()
        alive = [n for i, n in enumerate(nodes) if i != KILLED]
        await wait_for(lambda: all(ids[KILLED] not in n.host.get_connected_peers() for n in alive))
        await _settled(alive)
        tables = {n.peer_id: lp.routing_table(n.dht).get_peer_ids() for n in nodes}
        results = []
        for src, key in CASES:
            results.append(await closest_peers(nodes[src].dht, key, count=COUNT))
            await _settled(alive)
        return ids, tables, results


async def _sim(ids, tables):
    net = SimNetwork(seed=0, links=LinkModel(query_loss=0.0))
    for pid in ids:
        net.new_peer(public=True, peer_id=pid).server = True
    for pid, table in tables.items():
        for q in table:
            await net.peers[pid].rt.add_peer(PeerInfo(q, []))
    net.kill(net.peers[ids[KILLED]])
    out = []
    for src, key in CASES:
        trace = await net.lookup(net.peers[ids[src]], key, serial=net.next_serial(), count=COUNT)
        out.append(trace.peers)
    return out, net


def test_simulated_lookups_return_what_real_lookups_return(tmp_path):
    ids, tables, real = trio.run(_real, tmp_path)
    sim, _net = run_virtual(_sim, ids, tables)
    assert sim == real
    assert all(len(r) == COUNT for r in real)
    assert all(ids[KILLED] not in r for r in real)
    # not trivial: some lookups found peers that their start table did not hold
    assert any(set(r) - set(tables[ids[src]]) for (src, _k), r in zip(CASES, real, strict=True))
    # the killed peer was still listed in tables the lookups started from
    assert any(ids[KILLED] in tables[ids[src]] for src, _k in CASES)

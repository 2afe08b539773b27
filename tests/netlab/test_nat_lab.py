"""NAT traversal proven on real NATs (network namespaces + iptables MASQUERADE).

Lab: relay R (public), a public peer P, peers A, B, C each behind its own NAT.
Order matters inside the module (C's NAT gets a blocking rule in the last test).
"""

from __future__ import annotations

import pytest

from tests.netlab.conftest import Swarm
from tests.netlab.lab import NatLab, unavailable_reason

pytestmark = [pytest.mark.netlab, pytest.mark.timeout(240)]


def test_reachability_public_and_private(swarm: Swarm) -> None:
    assert swarm.relay.ready["reachability"] == "public"
    # A public node is confirmed by a dial-back on a fresh connection ...
    assert swarm.public.ready["reachability"] == "public"
    assert swarm.public.ready["advice"] is None
    # ... NATed nodes are not (AutoNAT v1 would say "public" here: it reuses the connection).
    for node, router in ((swarm.a, 0), (swarm.b, 1), (swarm.c, 2)):
        assert node.ready["reachability"] == "private", node.ready
        wan_ip = swarm.lab.routers[router].wan_ip
        advice = node.ready["advice"]
        assert wan_ip in advice and "forward TCP port 4001" in advice
    snap = swarm.relay.command({"cmd": "snapshot"}, "snapshot")
    assert snap["hop_enabled"] is True
    assert snap["dialback_checks_served"] >= 4


def test_reservation_and_relayed_connection(swarm: Swarm) -> None:
    relay_id = swarm.relay.peer_id
    for node in (swarm.a, swarm.b, swarm.c):
        (addr,) = node.ready["relay_addrs"]
        assert addr == f"{swarm.relay_addr}/p2p-circuit/p2p/{node.peer_id}"
        assert f"/p2p/{relay_id}/p2p-circuit" in addr
    # The public node holds no reservation and runs no relay (only public + willing nodes hop).
    assert swarm.public.ready["relay_addrs"] == []

    got = swarm.b.command({"cmd": "connect", "addrs": swarm.a.ready["relay_addrs"]}, "connected")
    assert got["peer"] == swarm.a.peer_id
    assert got["kind"] == "relayed"
    # Data flows end to end through the relay (B's first stream rides the only connection).
    echo = swarm.b.command({"cmd": "echo", "peer": swarm.a.peer_id, "size": 4096, "count": 5}, "echo")
    assert echo["count"] == 5


def test_dcutr_hole_punch_gives_direct_connection(swarm: Swarm) -> None:
    up = swarm.b.command({"cmd": "upgrade", "peer": swarm.a.peer_id, "timeout": 45}, "upgraded", 60)
    assert up["kind"] == "hole_punched", up
    a_wan, b_wan = swarm.lab.routers[0].wan_ip, swarm.lab.routers[1].wan_ip

    conns = swarm.b.command({"cmd": "conns"}, "conns")["conns"]
    to_a = [c for c in conns if c["peer"] == swarm.a.peer_id and c["kind"] == "hole_punched"]
    assert to_a, conns
    # Direct: the remote end is A's NAT's public address, not the relay.
    assert to_a[0]["remote"] == f"{a_wan}:4001"
    assert all("p2p-circuit" not in x for x in to_a[0]["addrs"])
    # A sees it the same way.
    conns_a = swarm.a.command({"cmd": "conns"}, "conns")["conns"]
    assert any(c["peer"] == swarm.b.peer_id and c["kind"] == "hole_punched"
               and c["remote"] == f"{b_wan}:4001" for c in conns_a), conns_a
    # New streams use the direct connection.
    echo = swarm.b.command({"cmd": "echo", "peer": swarm.a.peer_id, "size": 4096, "count": 5}, "echo")
    assert echo["kind"] == "hole_punched"
    # Both NATs' conntrack tables hold the direct flow between the two public addresses.
    a_lan = swarm.lab.private(0).ip
    assert f"src={a_lan} dst={b_wan} sport=4001 dport=4001" in swarm.lab.conntrack(0)
    b_lan = swarm.lab.private(1).ip
    assert f"src={b_lan} dst={a_wan} sport=4001 dport=4001" in swarm.lab.conntrack(1)
    snap = swarm.b.command({"cmd": "snapshot"}, "snapshot")
    assert snap["connections"]["hole_punched"] >= 1
    assert snap["hole_punches"] >= 1


def test_relay_carries_traffic_when_hole_punching_is_impossible(swarm: Swarm) -> None:
    # NAT 2 drops every TCP packet from/to NAT 0's public address: no punch can land.
    swarm.lab.block_between(2, 0)
    got = swarm.c.command({"cmd": "connect", "addrs": swarm.a.ready["relay_addrs"]}, "connected")
    assert got["kind"] == "relayed"
    up = swarm.c.command({"cmd": "upgrade", "peer": swarm.a.peer_id, "timeout": 8}, "upgraded", 30)
    assert up["kind"] is None, up
    echo = swarm.c.command({"cmd": "echo", "peer": swarm.a.peer_id, "size": 65536, "count": 4}, "echo")
    assert echo["kind"] == "relayed"
    assert echo["count"] == 4
    conns = swarm.c.command({"cmd": "conns"}, "conns")["conns"]
    assert not [c for c in conns if c["peer"] == swarm.a.peer_id and c["kind"] != "relayed"]


@pytest.mark.timeout(60)
def test_lab_teardown_leaves_nothing() -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    lab = NatLab(n_lans=1, n_public=1)
    with lab:
        proc = lab.spawn(lab.private(0), ["sleep", "300"], name="sleeper")
        assert lab.leftover_namespaces()
    assert proc.popen.poll() is not None
    assert lab.leftover_namespaces() == []


def test_ending_one_circuit_leaves_other_circuits_to_the_same_peer(swarm: Swarm) -> None:
    # py-libp2p 0.8.1's relay keys its circuits by peer id: ending one circuit to A used to
    # close whichever circuit to A was opened last. Two circuits to A: B's (older), C's.
    a_circuit = swarm.a.ready["relay_addrs"][0]
    swarm.c.command({"cmd": "close_relayed", "peer": swarm.a.peer_id}, "closed")
    assert swarm.b.command({"cmd": "dial_circuit", "addr": a_circuit}, "dialed")["kind"] == "relayed"
    assert swarm.c.command({"cmd": "dial_circuit", "addr": a_circuit}, "dialed")["kind"] == "relayed"
    assert swarm.b.command({"cmd": "close_relayed", "peer": swarm.a.peer_id}, "closed")["count"] >= 1
    # C's circuit still carries traffic.
    echo = swarm.c.command({"cmd": "echo", "peer": swarm.a.peer_id, "size": 1024, "count": 3}, "echo")
    assert echo["kind"] == "relayed" and echo["count"] == 3

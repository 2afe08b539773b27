"""NAT-facing behaviour on loopback: DHT mode follows reachability, a private volunteer
announces relay-only addresses, a plain ``ClientNode`` reaches it through the relay, and
RPC streams leave a relayed connection once a direct one exists.

Loopback has no NAT, so "private" is declared (``public: no``) and the relay reservation
is requested by hand; the real NATs are in tests/netlab.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.peer.id import ID

from volunteer.client.node import ClientNode
from volunteer.experts.backend import ExpertBackend, OptimizerSpec
from volunteer.net.host import parse_peer_addr
from volunteer.net.nat.connections import is_relayed
from volunteer.net.service import NetworkService
from volunteer.runtime.limits import ServingLimits
from volunteer.runtime.runtime import Runtime
from volunteer.wire.messages import decode_reply, encode_request

HIDDEN = 8
UIDS = ["nat.0.0", "nat.0.1"]
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def net(bootstrap=(), relays=(), public="auto"):
    return SimpleNamespace(bootstrap=tuple(bootstrap), relays=tuple(relays), listen_port=0,
                           announce_addrs=(), public=public)


def poll(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def forward(transport, uid, x):
    frames = encode_request("forward", uid, [x], request_id=1, timeout=20.0)
    return decode_reply(transport.request(frames, timeout=20.0)).tensors[0]


def in_routing_table(svc: NetworkService, peer_id: str) -> bool:
    return svc._thread.call(_sync(lambda: ID.from_base58(peer_id)
                                  in svc.node.dht.routing_table.get_peer_ids()))


def speaks_kad(svc: NetworkService, peer_id: str) -> bool:
    store = svc.node.host.get_peerstore()
    return svc._thread.call(_sync(lambda: str(KAD_PROTOCOL_ID)
                                  in (store.get_protocols(ID.from_base58(peer_id)) or [])))


def _sync(fn):
    async def run():
        return fn()
    return run


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Relay/bootstrap R (public: yes), a public volunteer A (auto), and a private
    volunteer P (public: no) serving two experts with a reservation on R."""
    tmp = tmp_path_factory.mktemp("natpaths")
    torch.manual_seed(0)
    backends = {u: ExpertBackend(u, "ffn", HIDDEN, OptimizerSpec(lr=0.0)) for u in UIDS}
    runtime = Runtime(backends, ServingLimits())
    started: list = []
    try:
        runtime.start()
        r = NetworkService(tmp / "r", "exp", net(public="yes"), listen_host="127.0.0.1")
        started.append(r.start())
        boot = r.multiaddrs
        a = NetworkService(tmp / "a", "exp", net(boot), listen_host="127.0.0.1")
        started.append(a.start())
        p = NetworkService(tmp / "p", "exp", net(boot, relays=boot, public="no"),
                           submit=runtime.submit, listen_host="127.0.0.1")
        started.append(p.start())
        p._thread.call(p.nat.ensure_reservations)
        assert p.nat.relay_addrs, p.nat.reservation_errors
        assert p.announce(UIDS, "serving", 0.0).ok
        yield SimpleNamespace(r=r, a=a, p=p, boot=boot, backends=backends)
    finally:
        for svc in reversed(started):
            svc.stop()
        runtime.stop()


@pytest.mark.timeout(90)
def test_plain_client_node_reaches_private_volunteer_through_its_relay(lab):
    client = ClientNode("exp", lab.boot, listen_addrs=LOOPBACK)
    try:
        client.start()
        assert client.nat is None  # lazy: nothing needed a relay yet
        entries = client.servers(UIDS[0])
        assert entries and all("/p2p-circuit/" in a for a in entries[0].addrs), entries
        transports = client.directory(cache_ttl=0.0).resolve(UIDS)
        assert set(transports) == set(UIDS)
        assert lab.p.peer_id not in client.connected_peers()
        x = torch.randn(3, HIDDEN)
        with torch.no_grad():
            want = lab.backends[UIDS[1]].module(x)
        torch.testing.assert_close(forward(transports[UIDS[1]], UIDS[1], x), want)
        assert client.nat is not None and client.nat_error is None  # started on demand
        assert client.reachability == "public"  # loopback: the dial-back gets through
        assert lab.p.peer_id in client.connected_peers()
    finally:
        client.stop()


@pytest.mark.timeout(90)
def test_rpc_streams_move_from_relayed_to_direct_connection(lab):
    client = ClientNode("exp", lab.boot, listen_addrs=LOOPBACK, holepunch=False)
    try:
        client.start()
        pid = ID.from_base58(lab.p.peer_id)
        t = client.transport(lab.p.peer_id, lab.p.nat.relay_addrs)
        x = torch.randn(2, HIDDEN)
        with torch.no_grad():
            want = lab.backends[UIDS[0]].module(x)
        torch.testing.assert_close(forward(t, UIDS[0], x), want)

        def pool_kinds() -> list[bool]:
            return [c.relayed for c in client.rpc._pools.get(pid, [])]

        def conn_kinds() -> list[bool]:
            return [is_relayed(c) for c in client.node.host.get_network().get_connections(pid)]

        assert client.call(_sync(pool_kinds)) == [True]
        assert client.call(_sync(conn_kinds)) == [True]
        # A direct connection appears (as a late hole punch would make one).
        direct = parse_peer_addr(lab.p.multiaddrs[0])

        async def dial() -> None:  # host.connect() would keep the relayed connection
            await client.node.host.get_network().dial_addr(direct.addrs[0], pid)
        client.call(dial)
        assert sorted(client.call(_sync(conn_kinds))) == [False, True]
        torch.testing.assert_close(forward(t, UIDS[0], x), want)
        assert client.rpc.stats.streams_retired == 1
        assert client.call(_sync(pool_kinds)) == [False]
    finally:
        client.stop()


@pytest.mark.timeout(90)
def test_dht_mode_follows_reachability(lab):
    # R declared public, A found public by dial-back: DHT servers, in R's routing table.
    assert lab.r.dht_server and lab.a.reachability == "public" and lab.a.dht_server
    assert lab.a.snapshot()["dht_mode"] == "server"
    poll(lambda: in_routing_table(lab.r, lab.a.peer_id))
    # P is private: a DHT client, absent from R's table although it announced through R.
    assert lab.p.reachability == "private" and not lab.p.dht_server
    assert lab.p.snapshot()["dht_mode"] == "client"
    assert not speaks_kad(lab.r, lab.p.peer_id)
    assert not in_routing_table(lab.r, lab.p.peer_id)
    # Switching at run time (last test: R then knows P as a server): identify/push
    # tells R, the self-lookup gets P into its table.
    assert lab.p._thread.call(lab.p.node.set_dht_server, True)
    poll(lambda: speaks_kad(lab.r, lab.p.peer_id) and in_routing_table(lab.r, lab.p.peer_id))
    assert lab.p._thread.call(lab.p.node.set_dht_server, False)
    poll(lambda: not speaks_kad(lab.r, lab.p.peer_id))
    assert not lab.p._thread.call(lab.p.node.set_dht_server, False)  # no change

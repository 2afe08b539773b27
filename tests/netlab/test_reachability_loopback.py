"""Dial-back reachability on loopback (no root needed): real libp2p hosts, real sockets.

On loopback every listener is reachable, so these tests check the protocol itself:
the fresh-connection dial-back, the Noise identity check, bounded/garbage input, the
decision function and the advice text. The NAT cases run in test_nat_lab.py.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from volunteer.net.host import build_host, full_multiaddrs, quiet_libp2p_logging, run_host
from volunteer.net.nat import reachability as rb
from volunteer.net.nat.traversal import NatTraversal

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def loopback_host() -> AsyncIterator:
    quiet_libp2p_logging()
    host = build_host(create_new_key_pair())
    async with run_host(host, ["/ip4/127.0.0.1/tcp/0"]):
        yield host


def test_decide_is_public_only_on_a_successful_dialback() -> None:
    ok = rb.DialbackAnswer(server="s1", observed_ip="1.2.3.4", reachable=["/ip4/1.2.3.4/tcp/1"])
    no = rb.DialbackAnswer(server="s2", observed_ip="1.2.3.4", reachable=[])
    err = rb.DialbackAnswer(server="s3", error="timed out")
    assert rb.decide([ok, no]) == rb.PUBLIC
    assert rb.decide([no, err]) == rb.PRIVATE
    assert rb.decide([err]) == rb.UNKNOWN
    assert rb.decide([]) == rb.UNKNOWN


def test_explain_names_the_fix() -> None:
    assert rb.explain(rb.PUBLIC, [4001], "5.6.7.8", [], 1) is None
    msg = rb.explain(rb.PRIVATE, [4001], "5.6.7.8", [], 0)
    assert "forward TCP port 4001" in msg and "/ip4/5.6.7.8/tcp/4001" in msg
    assert "network.relays" in msg
    msg = rb.explain(rb.PRIVATE, [4001], "5.6.7.8", [], 2)
    assert "could not reserve" in msg
    relayed = "/ip4/9.9.9.9/tcp/1/p2p/R/p2p-circuit/p2p/X"
    assert relayed in rb.explain(rb.PRIVATE, [4001], "5.6.7.8", [relayed], 1)
    assert "bootstrap" in rb.explain(rb.UNKNOWN, [4001], None, [], 1)


def test_dialback_reaches_a_listening_peer_and_checks_its_identity() -> None:
    async def main() -> None:
        async with loopback_host() as server, loopback_host() as client, loopback_host() as other:
            dialback = rb.DialbackServer(server, dial_timeout=3)
            dialback.install()
            await client.connect(rb_info(server))
            ports = rb.listen_ports(client)
            answer = await rb.ask_dialback(client, server.get_id(), ports)
            assert answer.error is None
            assert answer.observed_ip == "127.0.0.1"
            assert answer.reachable == [f"/ip4/127.0.0.1/tcp/{ports[0]}"]
            assert rb.decide([answer]) == rb.PUBLIC
            # The dial-back connection was fresh and closed: the server's swarm holds
            # only the connection the client opened.
            assert len(server.get_network().get_connections(client.get_id())) == 1
            # A port where a *different* peer listens: Noise proves the wrong identity.
            wrong = await rb.ask_dialback(client, server.get_id(), rb.listen_ports(other))
            assert wrong.error is None and wrong.reachable == []
            assert rb.decide([wrong]) == rb.PRIVATE
            assert dialback.checks_served == 2

    trio.run(main)


def test_dialback_server_answers_garbage_with_errors_and_keeps_serving() -> None:
    async def main() -> None:
        async with loopback_host() as server, loopback_host() as client:
            rb.DialbackServer(server, dial_timeout=3).install()
            await client.connect(rb_info(server))
            bad_requests = [
                struct.pack(">I", 10**9),  # length far above the bound: refused before reading
                struct.pack(">I", 3) + b"\xc1\xc1\xc1",  # not msgpack
                struct.pack(">I", 1) + b"\x07",  # msgpack, but not a map
                _frame({"v": 1, "ports": [0, 70000]}),  # out-of-range ports
                _frame({"v": 1, "ports": list(range(1, 50))}),  # too many ports
            ]
            for raw in bad_requests:
                stream = await client.new_stream(server.get_id(), [rb.DIALBACK_PROTOCOL])
                await stream.write(raw)
                with trio.fail_after(10):
                    reply = await rb.read_message(stream)
                assert reply["error"].startswith("bad request"), reply
                await stream.close()
            answer = await rb.ask_dialback(client, server.get_id(), rb.listen_ports(client))
            assert answer.error is None and answer.reachable

    trio.run(main)


def test_traversal_reports_unknown_when_no_relay_answers() -> None:
    async def main() -> None:
        async with loopback_host() as dead:
            dead_addr = full_multiaddrs(dead)[0]
        # ``dead`` is closed now: nothing listens at its address any more.
        async with loopback_host() as node:
            nat = NatTraversal(node, relays=[dead_addr], allow_hop=True, check_timeout=5)
            async with trio.open_nursery() as nursery:
                await nursery.start(nat.run)
                snap = nat.snapshot()
                assert snap["reachability"] == rb.UNKNOWN
                assert snap["hop_enabled"] is False  # never relay for others unless public
                assert snap["relay_addrs"] == []
                assert dead_addr in snap["reservation_errors"]
                assert "bootstrap" in snap["advice"]
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_traversal_on_a_public_node_enables_hop() -> None:
    async def main() -> None:
        async with loopback_host() as relay_host, loopback_host() as node:
            relay = NatTraversal(relay_host, relays=[], allow_hop=True, assume_public=True)
            async with trio.open_nursery() as nursery:
                await nursery.start(relay.run)
                nat = NatTraversal(node, relays=full_multiaddrs(relay_host), allow_hop=True)
                await nursery.start(nat.run)
                snap = nat.snapshot()
                assert snap["reachability"] == rb.PUBLIC
                assert snap["public_addrs"] == [f"/ip4/127.0.0.1/tcp/{rb.listen_ports(node)[0]}"]
                assert snap["hop_enabled"] is True and snap["advice"] is None
                assert snap["relay_addrs"] == []  # public nodes need no reservation
                assert relay.snapshot()["dialback_checks_served"] == 1
                nursery.cancel_scope.cancel()

    trio.run(main)


def rb_info(host):
    from volunteer.net.host import parse_peer_addr

    return parse_peer_addr(full_multiaddrs(host)[0])


def _frame(message: dict) -> bytes:
    import msgpack

    body = msgpack.packb(message)
    return struct.pack(">I", len(body)) + body


def test_relays_are_found_among_connected_peers() -> None:
    """A node with no relay in its manifest finds one in the swarm (a peer speaking HOP)."""
    async def main() -> None:
        async with loopback_host() as relay_host, loopback_host() as plain, loopback_host() as node:
            relay = NatTraversal(relay_host, relays=[], allow_hop=True, assume_public=True)
            async with trio.open_nursery() as nursery:
                await nursery.start(relay.run)
                nat = NatTraversal(node, relays=[], allow_hop=False,
                                   bootstrap=full_multiaddrs(relay_host) + full_multiaddrs(plain))
                await nursery.start(nat.run)
                want = full_multiaddrs(relay_host)[0]
                with trio.fail_after(10):  # identify fills in the protocols shortly after connect
                    while want not in nat._swarm_relays():
                        await trio.sleep(0.05)
                assert nat._swarm_relays() == [want]  # the plain peer is no relay
                nursery.cancel_scope.cancel()

    trio.run(main)

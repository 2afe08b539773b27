"""The tripwire for py-libp2p internals: every reach of ``libp2p_adapter`` on real objects.

If a py-libp2p upgrade renames or reshapes any internal that ``volunteer.net`` relies on,
one of these tests fails with the name of the reach, instead of a feature silently turning
off in production.
"""

from __future__ import annotations

import socket

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol

from tests.net.swarm_helpers import swarm
from volunteer.net import libp2p_adapter as lp
from volunteer.net.nat.relay import RelayNode

PROTO = TProtocol("/volunteer-test/adapter/1")


def test_installed_py_libp2p_is_a_verified_version() -> None:
    assert lp.libp2p_version() in lp.VERIFIED_VERSIONS, (
        f"py-libp2p {lp.libp2p_version()} is installed but volunteer.net.libp2p_adapter was verified "
        f"against {lp.VERIFIED_VERSIONS}: run tests/net/test_libp2p_adapter.py, fix the adapter, "
        "then add the version to VERIFIED_VERSIONS")


@pytest.mark.timeout(60)
def test_connection_stream_and_dht_reaches_on_real_hosts(tmp_path) -> None:
    async def main() -> None:
        async with swarm(tmp_path, 2) as (a, b):
            b_id = b.host.get_id()

            async def handler(stream) -> None:  # type: ignore[no-untyped-def]
                await stream.read(1)
                await stream.close()

            b.host.set_stream_handler(PROTO, handler)
            stream = await a.host.new_stream(b_id, [PROTO])
            try:
                table = lp.connections_by_peer(a.host)
                assert table.get(b_id)
                (_, conn), *_ = [pc for pc in lp.open_connections(a.host) if pc[0] == b_id]
                assert not lp.is_closed(conn) and not lp.is_relayed(conn)
                assert lp.connection_counts(a.host) == {"direct": len(lp.open_connections(a.host)), "relayed": 0}
                assert any(x.startswith("/ip4/127.0.0.1/tcp/") for x in lp.transport_addrs(conn))
                assert lp.connection_of_stream(a.host, b_id, stream) is conn
                assert lp.stream_peer_id(stream) == b_id
                assert lp.stream_transport_addrs(stream) == lp.transport_addrs(conn)
                ip, port = lp.remote_address(stream)  # type: ignore[misc]
                assert ip == "127.0.0.1" and port > 0
                sock = lp.tcp_socket(conn)
                assert sock.family == socket.AF_INET and sock.fileno() >= 0
                assert sock.getpeername()[1] == port
            finally:
                await stream.write(b"x")
                await stream.close()

            # Kademlia: mode, routing table, value store.
            assert lp.dht_is_server(a.dht) and lp.dht_is_server(b.dht)
            assert lp.routing_table_size(a.dht) >= 1
            assert b_id in lp.routing_table(a.dht).find_local_closest_peers(b_id.to_bytes(), 4)
            store = lp.value_store(a.dht)
            lp.replace_value_store(a.dht, store)
            assert lp.value_store(a.dht) is store and callable(store.get)
            # our own state can live beside their host and DHT objects (weakly referenced)
            assert lp.side_state(a.host, "t", dict) is lp.side_state(a.host, "t", list)
            assert lp.side_state(a.dht, "t", dict) == {}

    trio.run(main)


@pytest.mark.timeout(60)
def test_nat_internals_dcutr_and_relay(tmp_path) -> None:
    async def main() -> None:
        async with swarm(tmp_path, 1) as (a,):
            me = a.host.get_id()
            dcutr = DCUtRProtocol(a.host)
            assert isinstance(dcutr._in_progress, set) and isinstance(dcutr._hole_punch_attempts, dict)
            assert lp.dcutr_in_progress(dcutr, me) is False
            dcutr._in_progress.add(me)  # what a running session records
            assert lp.dcutr_in_progress(dcutr, me) is True
            dcutr._hole_punch_attempts[me] = 3
            lp.dcutr_forget_attempts(dcutr, me)
            assert me not in dcutr._hole_punch_attempts

            relay = RelayNode(a.host, allow_hop=True)
            assert lp.relay_reservations(relay.transport) == []
            assert isinstance(relay.transport._reservations, dict)
            assert lp.active_relays(relay.protocol) == {}
            lp.check_relay_protocol(CircuitV2Protocol)

    trio.run(main)


def test_a_missing_internal_is_a_loud_typed_error() -> None:
    class Renamed:
        def __init__(self) -> None:
            self.in_progress_v2: set = set()

    with pytest.raises(lp.Libp2pInternalsError, match=r"DCUtR sessions in progress \(Renamed\._in_progress\)"):
        lp.dcutr_in_progress(Renamed(), None)  # type: ignore[arg-type]

    class NewRelay:
        async def _relay_data(self, src, dst, key) -> None:  # type: ignore[no-untyped-def]
            return None

    with pytest.raises(lp.Libp2pInternalsError, match="_relay_data takes"):
        lp.check_relay_protocol(NewRelay)


def test_side_state_lives_beside_the_object_not_on_it() -> None:
    class Obj:
        pass

    o = Obj()
    made = lp.side_state(o, "tracker", lambda: ["state"])
    assert lp.side_state(o, "tracker", lambda: ["other"]) is made
    assert lp.peek_side_state(o, "tracker") is made and lp.peek_side_state(o, "nope") is None
    assert not vars(o)  # nothing set on the object itself

"""The swarm view counts a node with direct addresses and no verdict yet as unknown, not
relayed, even when it also holds a relay slot (issue 12 review, F2 #6)."""

from __future__ import annotations

from tests.doctor.helpers import entry
from volunteer.doctor.swarm_summary import PRIVATE, PUBLIC, RELAYED, UNKNOWN, reach_class

PEER = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
RELAY = "/ip4/127.0.0.1/tcp/4002/p2p/12D3KooWRelayRelayRelayRelayRelayRelayRelayRelayRe"
DIRECT = f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"
CIRCUIT = f"{RELAY}/p2p-circuit/p2p/{PEER}"


def _class(reachability: str, *addrs: str) -> str:
    return reach_class(entry(PEER, "demo.ffn.0.", ("0",), reachability=reachability, addrs=addrs))


def test_unknown_with_direct_addresses_is_unknown_even_with_a_relay_slot() -> None:
    assert _class("unknown", DIRECT, CIRCUIT) == UNKNOWN  # the founder of a new swarm, say
    assert _class("unknown", DIRECT) == UNKNOWN


def test_the_other_classes_are_unchanged() -> None:
    assert _class("public", DIRECT, CIRCUIT) == PUBLIC
    assert _class("private", DIRECT, CIRCUIT) == RELAYED
    assert _class("private", DIRECT) == PRIVATE
    assert _class("unknown", CIRCUIT) == RELAYED  # only reachable through its relay

"""Verdicts of the network probe (pure): who fails the node (nobody can dial it, joining
failed, a clock far off), who only warns (unknown reachability, a failed hole punch)."""

from __future__ import annotations

import time

from tests.doctor.helpers import entry
from volunteer.doctor.network import ProbeResult
from volunteer.doctor.network_checks import network_checks
from volunteer.doctor.report import FAIL, OK, SKIP, WARN

PEER = "12D3KooWJik9SDvQrdNggBWJZTXzTskZdQ2AKc63QrK74iMwMbEx"
RELAY = f"/ip4/198.51.100.1/tcp/4001/p2p/{PEER}"


def _by_name(result: ProbeResult) -> dict[str, tuple[str, str, str]]:
    return {c.name: (c.verdict, c.detail, c.fix) for c in network_checks(result, 60.0)}


def _joined(**fields: object) -> ProbeResult:
    base = {"connected": [PEER], "listen_ports": [4001], "read_at": time.time()}
    return ProbeResult(**{**base, **fields})  # type: ignore[arg-type]


def test_public_node_with_peers_is_ok() -> None:
    now = time.time()
    checks = _by_name(_joined(reachability="public", observed_ip="203.0.113.9",
                              entries=[entry(p, "demo.ffn.", ("0",), announced=now - 1) for p in "ABC"]))
    assert checks["reachability"][0] == OK and "203.0.113.9" in checks["reachability"][1]
    assert checks["relay"][0] == OK and checks["clock"][0] == OK
    assert checks["hole punch"][0] == SKIP and "not offered" in checks["hole punch"][1]


def test_natted_without_relay_cannot_serve_with_relay_can() -> None:
    alone = _by_name(_joined(reachability="private", observed_ip="203.0.113.9",
                             relay_errors={RELAY: "relay refused the reservation (not a relay, or full)"}))
    assert alone["reachability"][0] == WARN and "forward TCP port 4001" in alone["reachability"][2]
    assert alone["relay"][0] == FAIL and "network.relays" in alone["relay"][2] and "refused" in alone["relay"][1]
    relayed = _by_name(_joined(reachability="private", relay=RELAY))
    assert relayed["relay"][0] == OK and RELAY in relayed["relay"][1]


def test_unknown_reachability_and_a_failed_punch_only_warn() -> None:
    checks = _by_name(_joined(reachability="unknown", dialback_errors=["12D3KooWJik9: timed out"],
                              punch_peer=PEER, punch_kind="relayed",
                              punch_error="the connection stayed relayed (DCUtR found no direct path)"))
    assert checks["reachability"][0] == WARN and "timed out" in checks["reachability"][1]
    assert checks["relay"][0] == WARN
    assert checks["hole punch"][0] == WARN and "stayed relayed" in checks["hole punch"][1]
    punched = _by_name(_joined(reachability="public", punch_peer=PEER, punch_kind="hole_punched"))
    assert punched["hole punch"][0] == OK and "punched a direct connection" in punched["hole punch"][1]


def test_joining_that_failed_after_a_good_dial_fails() -> None:
    checks = network_checks(ProbeResult(error="TooSlowError: "), 60.0)
    assert [c.verdict for c in checks] == [FAIL] and "TooSlowError" in checks[0].detail

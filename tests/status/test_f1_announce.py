"""The status ``dht`` row and the daemon's ready line apply one rule: experts are announced only
while a peer is connected, or when the node founded a new swarm."""

from __future__ import annotations

import logging

from volunteer.daemon.network import announce_line
from volunteer.status.announce import IN_A_NEW_SWARM, IN_THE_DHT, announced_where
from volunteer.status.plain import render_plain

NET = {"peer_id": "12D3KooWTest", "addrs": [], "reachability": "unknown", "connected_peers": 0,
       "routing_table": 0, "new_swarm": False, "records_announced": 4, "announced_uids": 4,
       "state": "serving", "last_announce_ok": True, "heartbeats": 2,
       "bootstrap": {"peers": 1, "attempts": 3, "successes": 0, "last_error": "connection refused"}}


def dht_row(net: dict) -> str:
    line = next(line for line in render_plain({"network": net}).splitlines() if line.lstrip().startswith("dht"))
    return line.split("dht", 1)[1].strip()


def test_no_peer_means_not_announced_in_status_and_log() -> None:
    row = dht_row(NET)
    assert "not announced" in row and "connected to no peer" in row and "routing table 0" in row
    assert "announced as serving" not in row and "last announce ok" not in row
    level, line = announce_line("12D3", "demo", 1.0, NET)
    assert level == logging.WARNING and "not announced" in line


def test_a_connected_peer_or_a_new_swarm_means_announced() -> None:
    assert "4 expert(s) announced as serving" in dht_row(dict(NET, connected_peers=1, routing_table=1))
    assert "4 expert(s) announced as serving" in dht_row(dict(NET, new_swarm=True))
    assert announced_where(dict(NET, connected_peers=3)) == IN_THE_DHT
    assert announced_where(dict(NET, new_swarm=True)) == IN_A_NEW_SWARM
    for odd in (None, {}, {"connected_peers": "7"}, {"connected_peers": True}, {"connected_peers": -1}):
        assert announced_where(odd) is None

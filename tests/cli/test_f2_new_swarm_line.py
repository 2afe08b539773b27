"""A lone --new-swarm node says plainly that no other peer holds its records yet (issue 12
review, F2 #22)."""

from __future__ import annotations

import logging

from volunteer.daemon.network import announce_line


def test_a_new_swarm_line_says_no_other_peer_holds_the_records() -> None:
    level, line = announce_line("12D3", "demo", 1.5, {"connected_peers": 0, "new_swarm": True})
    assert level == logging.INFO
    assert "experts recorded in this node's DHT of experiment demo" in line
    assert "(a new swarm: peers that join through it will find them)" in line
    assert "announced" not in line
    _, line = announce_line("12D3", "demo", 1.5, {"connected_peers": 1, "new_swarm": True})
    assert "experts announced in the DHT of experiment demo" in line  # a peer holds them now

"""NetworkService lifecycle: persistent peer id, heartbeats, withdraw on stop, snapshot."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from volunteer.net.client_node import ClientNode
from volunteer.net.service import NetworkService

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def net(bootstrap=()):
    return SimpleNamespace(bootstrap=tuple(bootstrap), relays=(), listen_port=0,
                           announce_addrs=(), public="auto")


def poll(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_heartbeats_keep_short_lived_records_and_stop_withdraws(tmp_path):
    # a: records live 1.5 s (only heartbeats keep them); b: records live 60 s.
    a = NetworkService(tmp_path / "a", "exp", net(), listen_host="127.0.0.1", ttl=1.5,
                       enable_nat=False).start()
    b = client = None
    try:
        pid = a.peer_id
        b = NetworkService(tmp_path / "b", "exp", net(a.multiaddrs), listen_host="127.0.0.1",
                           ttl=60.0, enable_nat=False).start()
        assert b.snapshot()["bootstrap"]["successes"] == 1 and a.snapshot()["new_swarm"]
        assert a.announce(["moe.0"], "serving", 0.3).ok
        assert b.announce(["moe.1"], "serving", 0.1).ok
        client = ClientNode("exp", a.multiaddrs + b.multiaddrs, listen_addrs=LOOPBACK).start()
        start = a.heartbeats
        poll(lambda: a.heartbeats >= start + 4)  # well past a's 1.5 s ttl
        assert client.children(["moe."]) == {"moe.": [0, 1]}
        assert {e.load for e in client.servers("moe.0")} == {0.3}
        b.stop()  # withdraws its records: gone long before their 60 s expiry
        poll(lambda: client.children(["moe."]) == {"moe.": [0]})
        snap = a.snapshot()
        assert snap["records_announced"] >= 5 and snap["heartbeats"] >= 4
        assert snap["last_announce_ok"] is True
    finally:
        for x in (client, b, a):
            if x is not None:
                x.stop()
    # Same home, same identity; snapshot works before start too.
    again = NetworkService(tmp_path / "a", "exp", net(), listen_host="127.0.0.1", enable_nat=False)
    assert again.peer_id == pid
    assert again.snapshot()["peer_id"] == pid

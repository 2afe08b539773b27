"""NetworkService lifecycle: persistent peer id, heartbeats, withdraw on stop, snapshot."""

from __future__ import annotations

import errno
import logging
import socket
import time
from types import SimpleNamespace

import pytest

from volunteer.net.client_node import ClientNode
from volunteer.net.service import ListenError, NetworkService

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


@pytest.mark.timeout(60)
def test_start_raises_when_the_port_is_taken(tmp_path):
    busy = socket.socket()
    svc = None
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        svc = NetworkService(tmp_path / "a", "exp", SimpleNamespace(**{**vars(net()), "listen_port": port}),
                             listen_host="127.0.0.1", enable_nat=False)
        with pytest.raises(ListenError) as err:
            svc.start(timeout=30)
    finally:
        busy.close()
        if svc is not None:
            svc.stop()
    assert err.value.errno == errno.EADDRINUSE and err.value.address == f"127.0.0.1:{port}"
    assert f"cannot listen on 127.0.0.1:{port}" in str(err.value) and "\n" not in str(err.value)
    assert not svc._thread.running  # nothing left running behind the error


@pytest.mark.timeout(90)
def test_lone_new_swarm_node_gets_no_reachability_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="volunteer.net.nat")
    lone = NetworkService(tmp_path / "lone", "exp", net(), listen_host="127.0.0.1").start()
    joiner = None
    try:
        assert lone.reachability == "unknown"  # nobody to ask: expected, nothing to fix
        assert lone.snapshot()["nat"]["advice"] is None
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "Reachability" in r.message]
        # A node whose bootstrap peer does not answer keeps the advice and the warning.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead_port = probe.getsockname()[1]
        dead = f"/ip4/127.0.0.1/tcp/{dead_port}/p2p/{lone.peer_id}"
        joiner = NetworkService(tmp_path / "joiner", "exp", net([dead]), listen_host="127.0.0.1").start()
        assert joiner.reachability == "unknown"
        assert "bootstrap" in joiner.snapshot()["nat"]["advice"]
        assert [r for r in caplog.records if r.levelno == logging.WARNING and "Reachability unknown" in r.message]
    finally:
        for svc in (joiner, lone):
            if svc is not None:
                svc.stop()

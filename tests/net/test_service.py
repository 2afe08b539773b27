"""NetworkService lifecycle: persistent peer id, heartbeats, withdraw on stop, snapshot,
typed configuration and thread ownership (loop-owned state read only through the bridge)."""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time

import pytest

from volunteer.client.node import ClientNode
from volunteer.manifest.schema import NetworkConfig as ManifestNetwork
from volunteer.net.config import NetworkConfig
from volunteer.net.service import ListenError, NetworkService
from volunteer.net.trio_thread import TrioThreadError
from volunteer.runtime.limits import ServingLimits

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def net(bootstrap=(), **kw) -> NetworkConfig:
    return NetworkConfig(bootstrap=tuple(bootstrap), **kw)


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
        start = a.snapshot()["heartbeats"]  # loop-owned: read through the bridge
        poll(lambda: a.snapshot()["heartbeats"] >= start + 4)  # well past a's 1.5 s ttl
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
        svc = NetworkService(tmp_path / "a", "exp", net(listen_port=port), listen_host="127.0.0.1",
                             enable_nat=False)
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


def test_config_is_typed_and_a_manifest_section_converts() -> None:
    section = ManifestNetwork(bootstrap=("/ip4/127.0.0.1/tcp/4001/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN",),
                              listen_port=4100, public="no")
    cfg = NetworkConfig.from_section(section, listen_host="127.0.0.1", ttl=9.0)
    assert (cfg.bootstrap, cfg.listen_port, cfg.public, cfg.ttl) == (section.bootstrap, 4100, "no", 9.0)
    assert cfg.heartbeat_s == 4.5 and not cfg.new_swarm and cfg.enable_nat  # ttl / 2
    for bad in ({"public": "maybe"}, {"listen_port": 70000}, {"ttl": 0.0}, {"bootstrap": "/ip4/1.2.3.4"},
                {"heartbeat_interval": float("nan")}, {"enable_nat": "yes"}):
        with pytest.raises(ValueError, match=rf"NetworkConfig\.{next(iter(bad))}"):
            NetworkConfig(**bad)


@pytest.mark.timeout(90)
def test_service_takes_config_and_limits_and_the_rpc_server_gets_them(tmp_path):
    limits = ServingLimits(max_bytes=8192, max_tensors=3, max_queued_bytes=1 << 20)
    svc = NetworkService(tmp_path / "a", "exp", net(), submit=lambda frames, reply: None,
                         listen_host="127.0.0.1", enable_nat=False, limits=limits, ttl=30.0)
    assert svc.config.listen_host == "127.0.0.1" and svc.config.ttl == 30.0 and not svc.config.enable_nat
    svc.start()
    try:
        rpc = svc._thread.run_sync(lambda: svc.rpc)
        assert rpc.limits == limits.wire()  # the same message bounds as the ZeroMQ frontend
        assert rpc.budget.capacity == limits.max_queued_bytes
    finally:
        svc.stop()


@pytest.mark.timeout(90)
def test_snapshot_reads_loop_owned_state_only_in_the_loop_thread(tmp_path):
    svc = NetworkService(tmp_path / "a", "exp", net(), submit=lambda frames, reply: None,
                         listen_host="127.0.0.1").start()
    try:
        loop_thread = svc._thread._thread
        seen: list[threading.Thread] = []

        def spy(obj, name):  # record the thread of every read of a loop-owned object
            real = getattr(obj, name)

            def wrapper(*a, **k):
                seen.append(threading.current_thread())
                return real(*a, **k)
            setattr(obj, name, wrapper)

        spy(svc.node.host, "get_connected_peers")
        spy(svc.node.dht, "get_routing_table_size")
        spy(svc.nat, "snapshot")
        spy(svc.rpc.stats, "as_dict")
        snap = svc.snapshot()  # from the test's (main) thread
        assert snap["peer_id"] == svc.peer_id and snap["rpc"] is not None
        assert len(seen) == 4 and all(t is loop_thread for t in seen), seen
        assert svc.multiaddrs and svc.reachability in ("public", "private", "unknown")
        assert svc.dht_server is True  # a new swarm serves the DHT at once
        svc.set_load(0.75)  # handed to the loop without waiting; the next read sees it there
        assert svc._thread.run_sync(lambda: svc._load) == 0.75
        # The accessors refuse to run outside the loop while it runs.
        for accessor in (svc._snapshot_now, svc._multiaddrs_now, svc._nat_reachability_now, svc._dht_server_now):
            with pytest.raises(TrioThreadError, match="owned by the event loop thread"):
                accessor()
    finally:
        svc.stop()
    assert svc.snapshot()["peer_id"] == svc.peer_id  # after stop: no owner left, read directly

"""The daemon's network glue: join flags applied to the manifest, load, degraded "why"."""

from __future__ import annotations

import pytest

from volunteer.daemon.health import assess
from volunteer.daemon.network import (
    NetworkStartError,
    effective_network,
    network_load,
    network_problem,
    start_network,
)
from volunteer.daemon.settings import SettingsError
from volunteer.manifest import load_manifest
from volunteer.manifest.schema import NetworkConfig

PEER = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
OTHER = "/ip4/127.0.0.1/tcp/4002/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


def test_bootstrap_flags_extend_and_new_swarm_clears() -> None:
    net = NetworkConfig(bootstrap=(OTHER,), relays=(), listen_port=0)
    assert effective_network(net).bootstrap == (OTHER,)
    assert effective_network(net, [PEER, PEER]).bootstrap == (PEER, OTHER)  # flags first, no duplicates
    assert effective_network(net, [], new_swarm=True).bootstrap == ()
    assert effective_network(net, [], new_swarm=True).listen_port == 0


@pytest.mark.parametrize("bad, why", [
    ("not-an-addr", "not a multiaddr"),
    ("/ip4/127.0.0.1/tcp/4001", "/p2p/<peer id>"),
])
def test_bad_bootstrap_flags_are_one_line_settings_errors(bad: str, why: str) -> None:
    with pytest.raises(SettingsError, match="--bootstrap") as err:
        effective_network(NetworkConfig(), [bad])
    assert why in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SettingsError, match="--new-swarm"):
        effective_network(NetworkConfig(), [PEER], new_swarm=True)


def test_load_is_the_fullest_queue_fraction() -> None:
    assert network_load({}, 100) == 0.0
    assert network_load({"a": {"queue_depth": 10}, "b": {"queue_depth": 50}}, 100) == 0.5
    assert network_load({"a": {"queue_depth": 500}}, 100) == 1.0


def test_network_problem_lines_and_health() -> None:
    ok = {"new_swarm": False, "connected_peers": 2, "last_announce_ok": True, "bootstrap": {}}
    assert network_problem(None) is None and network_problem(ok) is None
    assert network_problem(dict(ok, new_swarm=True, connected_peers=0)) is None  # alone in a new swarm: fine
    lonely = network_problem(dict(ok, connected_peers=0, bootstrap={"last_error": "connection refused"}))
    assert lonely is not None and "no peer" in lonely and "connection refused" in lonely
    assert "announce" in (network_problem(dict(ok, last_announce_ok=False)) or "")
    assert "failed" in (network_problem({"error": "RuntimeError: boom"}) or "")
    level, why = assess("serving", 0, {}, 0, 0.0, None, None, network_problem=lonely)
    assert level == "degraded" and why is not None and why.startswith("network: connected to no peer")


@pytest.mark.timeout(60)
def test_a_taken_port_is_a_one_line_start_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket

    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        net = NetworkConfig(listen_port=port)
        with pytest.raises(NetworkStartError) as err:
            start_network(tmp_path, "demo", net, lambda frames, reply: None, None, "127.0.0.1", [], 0.0,
                          timeout=30)
    finally:
        busy.close()
    text = str(err.value)
    assert f"127.0.0.1:{port}" in text and "--listen-port N" in text and "\n" not in text


def test_demo_manifest_network_is_a_new_swarm() -> None:
    assert load_manifest("demo").network.bootstrap == ()

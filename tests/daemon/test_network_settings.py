"""Per-machine network settings over the manifest's defaults, and a libp2p port that stays.

Units: ``effective_network`` with the settings ``listen_port``, ``announce_addrs`` and
``public`` from the environment and from flags (left at auto: the manifest's values), bad
addresses refused by the manifest's own rule naming the layer. Real daemons (subprocesses,
loopback): the port is kept across a restart; a kept port taken meanwhile moves with a
warning; a second daemon on an explicitly set, held port fails with one line.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.conftest import DaemonFactory, DaemonProc, cli_env
from volunteer.daemon.control_client import call
from volunteer.daemon.network import FROM_FLAG, effective_network
from volunteer.daemon.settings import SettingsError, resolve_settings
from volunteer.manifest.schema import NetworkConfig

PEER = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
MANIFEST = NetworkConfig(bootstrap=(PEER,), listen_port=4100, announce_addrs=("/ip4/198.51.100.1/tcp/4100",),
                         public="yes")


def settings(env: dict[str, str] | None = None, **flags: str):  # type: ignore[no-untyped-def]
    return resolve_settings(None, env or {}, flags)


def test_auto_settings_keep_the_manifest_values() -> None:
    net = effective_network(MANIFEST, settings=settings(), source="x.yaml")
    assert (net.listen_port, net.announce_addrs, net.public) == (4100, MANIFEST.announce_addrs, "yes")
    assert not net.keep_port and "network.listen_port (x.yaml)" in net.listen_port_origin
    assert net.origin_of(PEER) == "the manifest's network.bootstrap (x.yaml)"
    assert effective_network(NetworkConfig(), settings=settings()).keep_port  # 0 in the manifest: keep


def test_environment_overrides_the_manifest() -> None:
    env = {"VOLUNTEER_LISTEN_PORT": "4200", "VOLUNTEER_ANNOUNCE_ADDRS": "/ip4/203.0.113.5/tcp/4200, "
           "/dns4/node.example.org/tcp/4200", "VOLUNTEER_PUBLIC": "no"}
    net = effective_network(MANIFEST, settings=settings(env))
    assert net.listen_port == 4200 and net.public == "no" and not net.keep_port
    assert net.announce_addrs == ("/ip4/203.0.113.5/tcp/4200", "/dns4/node.example.org/tcp/4200")
    assert net.listen_port_origin == "the environment variable VOLUNTEER_LISTEN_PORT"
    assert effective_network(MANIFEST, settings=settings({"VOLUNTEER_ANNOUNCE_ADDRS": ""})).announce_addrs == ()


def test_flags_override_the_environment_and_the_manifest() -> None:
    env = {"VOLUNTEER_LISTEN_PORT": "4200", "VOLUNTEER_PUBLIC": "no"}
    net = effective_network(MANIFEST, [PEER.replace("4001", "4002")], settings=settings(
        env, listen_port="0", public="yes", announce_addrs="/ip4/203.0.113.9/tcp/4300"))
    assert net.listen_port == 0 and not net.keep_port  # explicit 0: any port, nothing reused
    assert net.public == "yes" and net.announce_addrs == ("/ip4/203.0.113.9/tcp/4300",)
    assert net.listen_port_origin.startswith("--listen-port")
    assert net.origin_of(PEER.replace("4001", "4002")) == FROM_FLAG and net.bootstrap[1] == PEER


@pytest.mark.parametrize("value, why", [("not-an-addr", "not a multiaddr"), ("/ip4/1.2.3.4/tcp/x", "not a multiaddr")])
def test_a_bad_announce_address_names_its_layer(value: str, why: str) -> None:
    with pytest.raises(SettingsError) as err:
        effective_network(MANIFEST, settings=settings({"VOLUNTEER_ANNOUNCE_ADDRS": value}))
    text = str(err.value)
    assert "VOLUNTEER_ANNOUNCE_ADDRS" in text and why in text and "\n" not in text


def test_public_accepts_yaml_booleans_and_refuses_others(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("public: yes\nlisten_port: 4500\n")  # YAML 1.1 reads yes as a boolean
    net = effective_network(NetworkConfig(), settings=resolve_settings(config, {}, {}))
    assert net.public == "yes" and net.listen_port == 4500 and "config.yaml" in net.listen_port_origin
    with pytest.raises(SettingsError, match="public"):
        settings(public="maybe")


# ------------------------------------------------------------------------- real daemons
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def libp2p_port(daemon: DaemonProc) -> int:
    """The TCP port of the node's advertised multiaddr (what others pass as --bootstrap)."""
    snap = call(daemon.home, "status", wait_s=10.0)
    addr = next(a for a in snap["network"]["addrs"] if a.startswith("/ip4/127.0.0.1/"))
    return int(addr.split("/tcp/")[1].split("/")[0])


def leave(daemon: DaemonProc) -> None:
    assert call(daemon.home, "leave", wait_s=10.0) is not None
    assert daemon.wait_exit(60) == 0, daemon.output()


@pytest.mark.timeout(240)
def test_the_port_is_kept_across_restarts_and_moves_when_taken(tmp_path: Path,
                                                              volunteer_daemon: DaemonFactory) -> None:
    home = tmp_path / "home"
    first = volunteer_daemon.start(home, "--num-experts", "1", network=True)
    port = libp2p_port(first)
    leave(first)
    again = volunteer_daemon.start(home, "--num-experts", "1", network=True)
    assert libp2p_port(again) == port, again.output()  # the printed --bootstrap address still works
    leave(again)
    with socket.socket() as squatter:  # another program took the port meanwhile
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        moved = volunteer_daemon.start(home, "--num-experts", "1", network=True)
        new_port = libp2p_port(moved)
        assert new_port != port
        assert f"the libp2p port {port} of the last run is taken" in moved.output()
        leave(moved)
    third = volunteer_daemon.start(home, "--num-experts", "1", network=True)
    assert libp2p_port(third) == new_port  # the new one is kept from now on


@pytest.mark.timeout(240)
def test_a_second_daemon_on_a_held_fixed_port_fails_in_one_line(tmp_path: Path,
                                                               volunteer_daemon: DaemonFactory) -> None:
    port = free_port()
    first = volunteer_daemon.start(tmp_path / "a", "--num-experts", "1",
                                   env=cli_env(network=True, VOLUNTEER_LISTEN_PORT=str(port)))
    assert libp2p_port(first) == port  # the environment overrides the manifest's 0
    second = volunteer_daemon.spawn(tmp_path / "b", "--num-experts", "1", "--listen-port", str(port),
                                    network=True)
    assert second.wait_exit(120) != 0
    out = second.output()
    line = next((ln for ln in out.splitlines() if "cannot start:" in ln), "")
    assert f"the libp2p port 127.0.0.1:{port} is in use" in line, out
    assert "pick another with --listen-port N" in line
    assert first.proc.poll() is None and libp2p_port(first) == port  # the first one serves on

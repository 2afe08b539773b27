"""An unreachable bootstrap peer in plain words, with where its address came from.

``probe_bootstrap`` against real libp2p hosts and sockets on 127.0.0.1 (refused, wrong peer
id, a port that accepts but never answers, a good peer); then a real daemon (subprocess) whose
bootstrap peers are a ``--bootstrap`` flag and a manifest entry, both dead: each gets its line
naming the address's origin, and the node does not claim its experts are announced.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from tests.conftest import DaemonFactory, DaemonProc
from volunteer.daemon.network import announce_line
from volunteer.net.dialing import (
    BAD_ADDRESS,
    OK,
    REFUSED,
    TIMED_OUT,
    WRONG_PEER,
    aprobe_bootstraps,
    probe_bootstrap,
)
from volunteer.net.host import build_host, peer_id_of, run_host

OTHER_ID = peer_id_of(create_new_key_pair()).to_base58()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
def test_probe_says_refused_wrong_peer_timed_out_and_ok() -> None:
    refused = closed_port()
    silent = socket.socket()  # accepts TCP (the kernel does) but never speaks libp2p
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    results = {}

    async def main() -> None:
        peer = build_host(create_new_key_pair())
        async with run_host(peer, ["/ip4/127.0.0.1/tcp/0"]):
            addr = str(peer.get_transport_addrs()[0])
            good = f"{addr}/p2p/{peer.get_id().to_base58()}"
            probes = [good, f"{addr}/p2p/{OTHER_ID}", f"/ip4/127.0.0.1/tcp/{refused}/p2p/{OTHER_ID}",
                      f"/ip4/127.0.0.1/tcp/{silent.getsockname()[1]}/p2p/{OTHER_ID}"]
            for r in await aprobe_bootstraps(probes, timeout=2.0):
                results[r.addr] = r
            results["good"], results["real_id"] = results[good], peer.get_id().to_base58()
            results["wrong"] = results[probes[1]]
            results["refused"], results["silent"] = results[probes[2]], results[probes[3]]

    try:
        trio.run(main)
    finally:
        silent.close()
    assert results["good"].kind == OK and results["good"].problem is None
    wrong = results["wrong"]
    assert wrong.kind == WRONG_PEER and wrong.peer_id == results["real_id"]
    assert f"expected {OTHER_ID}, got {results['real_id']}" in wrong.problem
    assert results["refused"].kind == REFUSED
    assert results["refused"].problem.startswith(f"connection refused at 127.0.0.1:{refused}")
    assert results["silent"].kind == TIMED_OUT and "timed out after 2 s at 127.0.0.1:" in results["silent"].problem
    for key in ("wrong", "refused", "silent"):
        assert "\n" not in results[key].problem


def test_probe_of_an_address_without_peer_id_is_a_bad_address() -> None:
    r = probe_bootstrap("/ip4/127.0.0.1/tcp/4001", timeout=1.0)
    assert r.kind == BAD_ADDRESS and "/p2p/<peer id>" in (r.problem or "")


def test_announce_line_claims_only_with_a_peer_or_in_a_new_swarm() -> None:
    level, line = announce_line("12D3", "demo", 1.5, {"connected_peers": 0, "new_swarm": False})
    assert level == logging.WARNING and "not announced" in line and "experts announced" not in line
    level, line = announce_line("12D3", "demo", 1.5, {"connected_peers": 2, "new_swarm": False})
    assert level == logging.INFO and "experts announced in the DHT" in line
    assert "experts recorded" in announce_line("12D3", "demo", 1.5, {"connected_peers": 0, "new_swarm": True})[1]


# ------------------------------------------------------------------------- a real daemon
@pytest.fixture(scope="module")
def lonely_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, dict[str, str]]]:
    """One daemon whose two bootstrap peers are dead: one from --bootstrap, one from its manifest."""
    tmp = tmp_path_factory.mktemp("lonely")
    flag_port, manifest_port = closed_port(), closed_port()
    flag_addr = f"/ip4/127.0.0.1/tcp/{flag_port}/p2p/{OTHER_ID}"
    manifest_addr = f"/ip4/127.0.0.1/tcp/{manifest_port}/p2p/{OTHER_ID}"
    demo = (Path(__file__).parents[2] / "configs" / "demo.yaml").read_text()
    manifest = tmp / "lonely.yaml"
    manifest.write_text(demo.replace("  bootstrap: []", f"  bootstrap: [{manifest_addr}]"))
    factory = DaemonFactory(tmp)
    try:
        daemon = factory.start(tmp / "home", "--num-experts", "1", "--bootstrap", flag_addr,
                               experiment=str(manifest), network=True)
        yield daemon, {"flag": flag_addr, "flag_port": str(flag_port), "manifest": manifest_addr,
                       "manifest_port": str(manifest_port), "manifest_path": str(manifest)}
    finally:
        factory.cleanup()


def _ready_log(daemon: DaemonProc) -> str:
    deadline = time.monotonic() + 30
    while "status: volunteer status" not in daemon.output() and time.monotonic() < deadline:
        time.sleep(0.05)  # control.json is written after the ready lines; this only guards a slow flush
    return daemon.output()


@pytest.mark.timeout(120)
def test_dead_bootstrap_peers_are_explained_with_their_origin(lonely_daemon: tuple[DaemonProc, dict[str, str]]) -> None:
    daemon, info = lonely_daemon
    log = _ready_log(daemon)
    flag_line = next((ln for ln in log.splitlines() if f"bootstrap peer {info['flag']}:" in ln), "")
    assert f"connection refused at 127.0.0.1:{info['flag_port']}" in flag_line, log
    assert "(address from the --bootstrap flag)" in flag_line
    manifest_line = next((ln for ln in log.splitlines() if f"bootstrap peer {info['manifest']}:" in ln), "")
    assert f"connection refused at 127.0.0.1:{info['manifest_port']}" in manifest_line, log
    assert f"the manifest's network.bootstrap ({info['manifest_path']})" in manifest_line
    assert re.search(r"no bootstrap peer answered; this node retries in the background\. Fix: ", log)


@pytest.mark.timeout(120)
def test_no_announced_claim_while_connected_to_no_peer(lonely_daemon: tuple[DaemonProc, dict[str, str]]) -> None:
    log = _ready_log(lonely_daemon[0])
    assert "experts announced" not in log
    assert "connected to no peer, so the experts are not announced" in log

"""A dead bootstrap peer stays explained: the last real dial failure and where the address
came from, not py-libp2p's "failed moments ago" retry (issue 12 review, F2 #3). A real
SwarmNode on loopback dials a closed port; the advice names the flag, not the manifest."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import trio

from tests.net.swarm_helpers import LOOPBACK
from volunteer.daemon.network import FROM_FLAG, _network_config, effective_network
from volunteer.manifest.schema import NetworkConfig as ManifestNetwork
from volunteer.net.host import load_or_create_identity
from volunteer.net.nat.reachability import UNKNOWN, explain
from volunteer.net.node import NodeConfig, SwarmNode

OTHER_ID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
def test_retries_keep_the_real_failure_and_its_origin(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = closed_port()
    dead = f"/ip4/127.0.0.1/tcp/{port}/p2p/{OTHER_ID}"
    caplog.set_level(logging.DEBUG, logger="volunteer.net.node")

    async def main() -> SwarmNode:
        node = SwarmNode(load_or_create_identity(tmp_path / "n"),
                         NodeConfig(listen_addrs=LOOPBACK, bootstrap=[dead], bootstrap_origins={dead: FROM_FLAG},
                                    backoff_initial=3600.0))  # the test drives the retries itself
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            for _ in range(3):  # immediate retries: the dialer's negative cache answers them
                assert await node.bootstrap_once() == 0
            nursery.cancel_scope.cancel()
        return node

    node = trio.run(main)
    last = node.bootstrap_state.last_error or ""
    assert f"connection refused at 127.0.0.1:{port}" in last, last
    assert "(address from the --bootstrap flag)" in last
    assert "not dialled again yet" not in last
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not [m for m in info if "not dialled again yet" in m], info
    assert any("connection refused" in m for m in info)  # the real failure is logged once


def test_unknown_reachability_advice_names_the_origin() -> None:
    text = explain(UNKNOWN, [4001], None, [], 0, bootstrap_origins=[FROM_FLAG])
    assert text is not None and "addresses from the --bootstrap flag" in text
    assert "manifest" not in text
    both = explain(UNKNOWN, [4001], None, [], 0,
                   bootstrap_origins=[FROM_FLAG, "the manifest's network.bootstrap (x.yaml)"])
    assert both is not None and "the --bootstrap flag and the manifest's network.bootstrap (x.yaml)" in both


def test_the_daemon_hands_the_origins_down_as_plain_data() -> None:
    flag = f"/ip4/127.0.0.1/tcp/9/p2p/{OTHER_ID}"
    ours = f"/ip4/127.0.0.1/tcp/10/p2p/{OTHER_ID}"
    net = effective_network(ManifestNetwork(bootstrap=(ours,)), [flag], source="my.yaml")
    config = _network_config(net, "127.0.0.1")
    assert config.origins == {flag: FROM_FLAG, ours: "the manifest's network.bootstrap (my.yaml)"}

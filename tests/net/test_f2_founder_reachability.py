"""The founder of a new swarm learns it is public once a peer that joined through it dials it
back, and announces so (issue 12 review, F2 #6). Two real NetworkServices on loopback: A
starts a new swarm (nobody to ask at start: unknown), B joins through A; A asks B, B dials A
on a fresh connection, A becomes public and its records say so."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from volunteer.client.node import ClientNode
from volunteer.net.config import NetworkConfig
from volunteer.net.service import NetworkService

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def poll(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


@pytest.mark.timeout(150)
def test_the_founder_becomes_public_when_its_first_peer_dials_it_back(tmp_path: Path) -> None:
    a = NetworkService(tmp_path / "a", "exp", NetworkConfig(), listen_host="127.0.0.1").start()
    b = client = None
    try:
        assert a.reachability == "unknown"  # a new swarm: nobody to ask at start
        assert a.announce(["moe.0"], "serving", 0.1).ok
        b = NetworkService(tmp_path / "b", "exp", NetworkConfig(bootstrap=tuple(a.multiaddrs)),
                           listen_host="127.0.0.1").start()
        poll(lambda: a.reachability == "public")  # B dialled A back on a fresh connection
        nat = a.snapshot()["nat"]
        assert nat["reachability"] == "public" and nat["public_addrs"]
        assert b.snapshot()["nat"]["dialback_checks_served"] >= 1
        client = ClientNode("exp", a.multiaddrs, listen_addrs=LOOPBACK).start()
        poll(lambda: {e.reachability for e in client.servers("moe.0")} == {"public"})  # re-announced
    finally:
        for x in (client, b, a):
            if x is not None:
                x.stop()


@pytest.mark.timeout(90)
def test_a_lone_founder_stays_unknown_without_advice(tmp_path: Path) -> None:
    a = NetworkService(tmp_path / "a", "exp", NetworkConfig(), listen_host="127.0.0.1").start()
    try:
        nat = a.snapshot()["nat"]
        assert nat["reachability"] == "unknown" and nat["advice"] is None
    finally:
        a.stop()

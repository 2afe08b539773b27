"""Admission in a real swarm: in a closed experiment, a validly signed record from a peer
without the owner's token is neither stored by admitted DHT servers nor read by admitted
clients, while admitted peers find each other; a node without a token cannot start."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from volunteer.client.node import ClientNode
from volunteer.manifest.admission import OPEN, AdmissionSpec
from volunteer.net import records
from volunteer.net.admission import AdmissionError, AdmissionPolicy, issue_token, owner_key_text
from volunteer.net.admission_files import create_owner_key, install_token
from volunteer.net.config import NetworkConfig
from volunteer.net.host import load_or_create_identity, peer_id_of
from volunteer.net.service import NetworkService

EXP = "closed-exp"
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def poll(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def peer_of(home: Path) -> str:
    return peer_id_of(load_or_create_identity(home / "identity")).to_base58()


def admit(home: Path, owner) -> None:
    """Install a token for the node whose home is ``home`` (as `volunteer admission` does)."""
    token = issue_token(owner, EXP, peer_of(home), expires=time.time() + 3600)
    install_token(home, EXP, token, peer_id=peer_of(home))


def service(home: Path, spec: AdmissionSpec, bootstrap=()) -> NetworkService:
    return NetworkService(home, EXP, NetworkConfig(bootstrap=tuple(bootstrap)), listen_host="127.0.0.1",
                          enable_nat=False, admission=spec).start()


@pytest.mark.timeout(180)
def test_unadmitted_records_are_ignored_and_admitted_peers_find_each_other(tmp_path):
    owner = create_owner_key(tmp_path / "owner.key")
    spec = AdmissionSpec(owner=owner_key_text(owner))
    for name in ("a", "c"):
        admit(tmp_path / name, owner)
    started: list = []
    client = None
    try:
        a = service(tmp_path / "a", spec)
        started.append(a)
        # b: a stranger with a valid key but no token; its own node runs "open", so it signs
        # and stores records like any honest node would.
        b = service(tmp_path / "b", OPEN, a.multiaddrs)
        started.append(b)
        c = service(tmp_path / "c", spec, a.multiaddrs)
        started.append(c)
        refused_before = records.STATS.get("not_admitted")
        assert a.announce(["moe.0"], "serving", 0.1).ok
        b.announce(["moe.1"], "serving", 0.0)
        assert c.announce(["moe.2"], "serving", 0.1).ok
        assert records.STATS.get("not_admitted") > refused_before  # a refused b's record
        policy = AdmissionPolicy.from_spec(spec, EXP)
        client = ClientNode(EXP, a.multiaddrs + c.multiaddrs, listen_addrs=LOOPBACK).start()
        directory = client.directory(admit=policy.admits_entry)

        def admitted_servers_seen() -> bool:
            directory.invalidate()  # read the DHT again, not the directory's cache
            return directory.children(["moe."]).get("moe.") == [0, 2]  # never b's 1

        poll(admitted_servers_seen)
        assert a.snapshot()["admission"] == "closed"
    finally:
        if client is not None:
            client.stop()
        for svc in reversed(started):
            svc.stop()


def test_a_node_without_a_token_cannot_start_in_a_closed_experiment(tmp_path):
    owner = create_owner_key(tmp_path / "owner.key")
    with pytest.raises(AdmissionError) as err:
        NetworkService(tmp_path / "n", EXP, NetworkConfig(), listen_host="127.0.0.1", enable_nat=False,
                       admission=AdmissionSpec(owner=owner_key_text(owner)))
    message = str(err.value)
    assert "\n" not in message and peer_of(tmp_path / "n") in message and "volunteer admission" in message
    # A listed peer needs no token.
    listed = AdmissionSpec(peers=(peer_of(tmp_path / "n"),))
    svc = NetworkService(tmp_path / "n", EXP, NetworkConfig(), listen_host="127.0.0.1", enable_nat=False,
                         admission=listed)
    assert svc.admission_token is None and not svc.admission.open

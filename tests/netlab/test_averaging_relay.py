"""Averaging through real NATs: two trainers behind separate NATs, one public bootstrap/relay.

Each trainer (``avg_trainer.py``: a ``ClientNode`` joining ``averaging_group``) finds out it
is private, takes a relay reservation, announces only its circuit address in its signed
member entry, finds the other member through the DHT and exchanges tensors with it on
``/volunteer/averaging/1.0.0``.

- ``blocked``: the two NATs drop all TCP between each other (``block_between``), so no hole
  punch can land: every exchange must go through the relay, and does.
- ``open``: nothing blocked; DCUtR may turn the relayed connection into a direct one. The
  test requires the exchanges to complete and reports which kind carried them (a punch
  that does not land in ``--upgrade-timeout`` leaves the traffic relayed, which is also
  correct behaviour).
"""

from __future__ import annotations

import tempfile

import pytest

from tests.netlab.conftest import skip_unless_lab
from tests.netlab.lab import NatLab

pytestmark = [pytest.mark.netlab, pytest.mark.timeout(420)]

VOLUNTEER = "tests.netlab.dmoe_volunteer"
TRAINER = "tests.netlab.avg_trainer"
EXCHANGES = 4


@pytest.mark.parametrize("paths", ["blocked", "open"])
def test_two_natted_trainers_average_through_the_relay(paths: str) -> None:
    skip_unless_lab()
    with tempfile.TemporaryDirectory() as homes, NatLab(n_lans=2, n_public=1) as lab:
        if paths == "blocked":
            lab.block_between(0, 1)
        pub = lab.public[0]
        boot = lab.spawn_python(pub, VOLUNTEER, "--ip", pub.ip, "--home", f"{homes}/boot",
                                "--public", "yes", name="bootstrap")
        boot_ready = boot.wait_for("ready", 90)
        assert boot_ready["reachability"] == "public"
        baddr = boot_ready["addrs"][0]

        trainers = []
        for lan in (0, 1):
            host = lab.private(lan)
            trainers.append(lab.spawn_python(
                host, TRAINER, "--ip", host.ip, "--bootstrap", baddr, "--run", "lab-avg",
                "--exchanges", str(EXCHANGES), name=f"trainer{lan}"))
        joined = [t.wait_for("joined", 150) for t in trainers]
        for j in joined:
            # private, with a reservation on the relay; its entry announces only the circuit
            assert j["reachability"] == "private", j
            assert j["relay_addrs"] and j["announced"] == j["relay_addrs"], j
            assert all("/p2p-circuit/" in a for a in j["announced"]), j
        ids = [j["peer_id"] for j in joined]
        for t, other in zip(trainers, reversed(ids), strict=True):
            assert t.wait_for("members", 120)["members"] == [other]

        done = [t.wait_for("exchanged", 240) for t in trainers]
        for d, other in zip(done, reversed(ids), strict=True):
            assert d["results"] == ["ok"] * EXCHANGES, d
            kind = d["connect_kinds"].get(other)
            print(f"{paths}: exchanges with {other[-8:]} ran on a {kind} connection "
                  f"(hole punches: {d['nat'].get('hole_punches')}; seconds per exchange of "
                  f"256 KiB each way, the first connecting: {d['took_s']})")
            if paths == "blocked":
                assert kind == "relayed", d
                assert d["nat"].get("hole_punches", 0) == 0, d
            else:
                assert kind in ("relayed", "hole_punched"), d
        for t, other in zip(trainers, reversed(ids), strict=True):
            t.send({"cmd": "served"})
            # each handler answered the other's exchanges, named by the connection's peer id
            assert t.wait_for("served", 30)["served"] == {other: EXCHANGES}
        for t in trainers:
            t.send({"cmd": "quit"})

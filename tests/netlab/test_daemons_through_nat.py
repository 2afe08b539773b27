"""The full proof with the real product on both ends: two ``volunteer join`` daemons
behind two NATs, a trainer (``ClientNode`` + ``DhtDirectory`` + RemoteMixtureOfExperts)
behind a third, a public bootstrap/relay node.

The test writes an experiment manifest naming the lab's bootstrap/relay multiaddr, starts
``python -m volunteer join <manifest> --home <dir> --listen-host <lan ip> ...`` inside each
volunteer's namespace and waits for readiness by polling ``volunteer status --json``
(tests/netlab/daemons.py). Both daemons host the whole 2x2 grid, so the trainer's
directory spreads calls over both. As in test_dmoe_through_nat.py, NAT 2 drops all TCP
to/from NAT 1: V1 is reached by a DCUtR hole punch, V2 only through the relay. The
daemons' status must say so too.
"""

from __future__ import annotations

import tempfile

import pytest

from tests.netlab.conftest import skip_unless_lab
from tests.netlab.daemons import GRID_UIDS, spawn_daemon, status, wait_joined, write_manifest
from tests.netlab.lab import NatLab

pytestmark = [pytest.mark.netlab, pytest.mark.timeout(300)]

BOOTSTRAP = "tests.netlab.dmoe_volunteer"
TRAINER = "tests.netlab.dmoe_trainer"
STEPS = 20


def test_trainer_trains_through_two_natted_volunteer_daemons() -> None:
    skip_unless_lab()
    with tempfile.TemporaryDirectory(prefix="vnl") as tmp, NatLab(n_lans=3, n_public=1) as lab:
        lab.block_between(2, 1)  # trainer's NAT <-> V2's NAT: no punch can land
        pub = lab.public[0]
        boot = lab.spawn_python(pub, BOOTSTRAP, "--ip", pub.ip, "--home", f"{tmp}/boot",
                                "--public", "yes", name="bootstrap")
        baddr = boot.wait_for("ready", 90)["addrs"][0]
        manifest = write_manifest(tmp, baddr)
        homes = {"v1": f"{tmp}/v1", "v2": f"{tmp}/v2"}
        daemons = {name: spawn_daemon(lab, lab.private(lan), manifest, homes[name], name)
                   for lan, name in ((0, "v1"), (1, "v2"))}
        ready = {name: snap for name, (_, snap) in wait_joined(daemons, homes, 150).items()}
        for name, snap in ready.items():
            net = snap["network"]
            assert net["reachability"] == "private", (name, net)
            assert net["relay"] and baddr.split("/p2p/")[-1] in net["relay"], (name, net)
            assert any("/p2p-circuit/" in a for a in net["relay_addrs"]), (name, net)
            assert sorted(snap["experts"]) == GRID_UIDS, (name, sorted(snap["experts"]))

        t_host = lab.private(2)
        trainer = lab.spawn_python(t_host, TRAINER, "--ip", t_host.ip, "--bootstrap", baddr,
                                   "--steps", str(STEPS), "--grid", "2", "2", name="trainer")
        assert trainer.wait_for("joined", 120)["reachability"] == "private"
        assert trainer.wait_for("discovered", 120)["first_dim"] == [0, 1]
        done = trainer.wait_for("done", 240)
        assert done["steps"] == STEPS and done["skipped"] == 0, done
        assert done["answered"] == GRID_UIDS
        assert done["last_loss"] < done["first_loss"]

        v1_id = ready["v1"]["network"]["peer_id"]
        v2_id = ready["v2"]["network"]["peer_id"]
        assert done["connect_kinds"][v1_id] == "hole_punched", done["kinds"]
        punched = [c for c in done["kinds"][v1_id] if c[0] == "hole_punched"]
        assert punched and punched[0][2] == f"{lab.routers[0].wan_ip}:4001", done["kinds"]
        assert done["connect_kinds"][v2_id] == "relayed", done["kinds"]
        assert all(c[0] == "relayed" for c in done["kinds"][v2_id]), done["kinds"]

        # The daemons' own status agrees, and both did the work.
        after = {name: status(home) for name, home in homes.items()}
        assert after["v1"]["network"]["peers"]["hole_punched"] >= 1, after["v1"]["network"]
        assert after["v2"]["network"]["peers"]["relayed"] >= 1, after["v2"]["network"]
        assert after["v2"]["network"]["peers"]["hole_punched"] == 0, after["v2"]["network"]
        for name, snap in after.items():
            updates = sum(int(e.get("updates_applied", 0)) for e in snap["experts"].values())
            assert updates >= 1, (name, snap["experts"])
        for uid in GRID_UIDS:  # every expert trained, wherever each step's call went
            total = sum(int(after[n]["experts"][uid].get("updates_applied", 0)) for n in after)
            assert total >= STEPS // 2, (uid, {n: after[n]["experts"][uid] for n in after})
        trainer.send({"cmd": "quit"})

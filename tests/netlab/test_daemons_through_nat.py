"""The full proof with the real product on both ends: two ``volunteer join`` daemons
behind two NATs, a trainer (``ClientNode`` + ``DhtDirectory`` + RemoteMixtureOfExperts)
behind a third, a public bootstrap/relay node.

The test writes an experiment manifest naming the lab's bootstrap/relay multiaddr, starts
``python -m volunteer join <manifest> --home <dir> --listen-host <lan ip> ...`` inside each
volunteer's namespace and waits for readiness by polling ``volunteer status --json``
(tests/netlab/daemons.py). V1 starts first and takes two experts of the 2x2 grid; V2,
started once V1 has announced, takes the other two, so each uid has exactly one server and
the trainer must use both. As in test_dmoe_through_nat.py, NAT 2 drops all TCP to/from
NAT 1: V1 is reached by a DCUtR hole punch, V2 only through the relay. The daemons' status
must say so too, and the routers' conntrack tables show the paths: a direct flow between
NAT 0 and the trainer's NAT, no answered flow between NAT 1 and it.
"""

from __future__ import annotations

import tempfile

import pytest

from tests.netlab.conftest import skip_unless_lab
from tests.netlab.conntrack import answered, tcp_flows, with_peer
from tests.netlab.daemons import GRID_UIDS, spawn_daemon, status, wait_joined, write_manifest
from tests.netlab.lab import NatLab

pytestmark = [pytest.mark.netlab, pytest.mark.timeout(300)]

BOOTSTRAP = "tests.netlab.dmoe_volunteer"
TRAINER = "tests.netlab.dmoe_trainer"
STEPS = 20
HOSTED = 2  # experts per daemon: V1 and V2 split the 2x2 grid


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
        # One after the other, two experts each: V2 sees V1's uids and takes the other two,
        # so every uid has one server and one path from the trainer (no replicas: a
        # replica downloads its shard from the other daemon, and the client's server
        # choice may leave a slower replica idle).
        daemons, ready = {}, {}
        for lan, name in ((0, "v1"), (1, "v2")):
            daemons[name] = spawn_daemon(lab, lab.private(lan), manifest, homes[name], name,
                                         num_experts=HOSTED)
            ready.update({name: snap for name, (_, snap)
                          in wait_joined({name: daemons[name]}, homes, 150).items()})
        for name, snap in ready.items():
            net = snap["network"]
            assert net["reachability"] == "private", (name, net)
            assert net["relay"] and baddr.split("/p2p/")[-1] in net["relay"], (name, net)
            assert any("/p2p-circuit/" in a for a in net["relay_addrs"]), (name, net)
            assert len(snap["experts"]) == HOSTED, (name, sorted(snap["experts"]))
        assert sorted([*ready["v1"]["experts"], *ready["v2"]["experts"]]) == GRID_UIDS, ready

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
        why = {k: done.get(k) for k in ("connect_kinds", "kinds", "nat")}
        assert done["connect_kinds"][v1_id] == "hole_punched", why
        punched = [c for c in done["kinds"][v1_id] if c[0] == "hole_punched"]
        assert punched and punched[0][2] == f"{lab.routers[0].wan_ip}:4001", done["kinds"]
        assert done["connect_kinds"][v2_id] == "relayed", why
        assert all(c[0] == "relayed" for c in done["kinds"][v2_id]), done["kinds"]

        # The daemons' own status agrees, and both did the work.
        after = {name: status(home) for name, home in homes.items()}
        assert after["v1"]["network"]["peers"]["hole_punched"] >= 1, after["v1"]["network"]
        assert after["v2"]["network"]["peers"]["relayed"] >= 1, after["v2"]["network"]
        # Per path, from the NATs themselves (V2's counts would also include any direct
        # connection to V1: nothing blocks NAT 0 <-> NAT 1).
        trainer_wan, v2_wan = lab.routers[2].wan_ip, lab.routers[1].wan_ip
        flows = {lan: tcp_flows(lab.conntrack(lan)) for lan in range(3)}
        v1_lan = lab.private(0).ip
        assert any(f["src"] == v1_lan and f["sport"] == f["dport"] == 4001
                   for f in answered(with_peer(flows[0], trainer_wan))), flows[0]
        # Nothing ever came back to V2's NAT from the trainer's, nor the other way round.
        assert not answered(with_peer(flows[1], trainer_wan)), flows[1]
        assert not answered(with_peer(flows[2], v2_wan)), flows[2]
        for name, snap in after.items():  # every expert trained, on its only server
            for uid, expert in snap["experts"].items():
                assert int(expert.get("updates_applied", 0)) >= STEPS // 2, (name, uid, expert)
        trainer.send({"cmd": "quit"})

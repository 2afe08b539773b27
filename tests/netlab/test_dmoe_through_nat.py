"""The full proof: a trainer behind one NAT trains a DMoE model through two volunteers
behind two other NATs, via a public bootstrap/relay node.

Volunteer V1 (NAT 0) gets a direct hole-punched connection from the trainer (NAT 2);
between V2 (NAT 1) and the trainer hole punching is made impossible (NAT 2 drops all TCP
to/from NAT 1's public address), so V2's traffic must flow through the relay. Training
must still use both: every expert of both volunteers applies updates.
"""

from __future__ import annotations

import tempfile

import pytest

from tests.netlab.conftest import skip_unless_lab
from tests.netlab.lab import NatLab

pytestmark = [pytest.mark.netlab, pytest.mark.timeout(420)]

VOLUNTEER = "tests.netlab.dmoe_volunteer"
TRAINER = "tests.netlab.dmoe_trainer"
STEPS = 30
V1_UIDS = ["lab.ffn.0.0", "lab.ffn.0.1"]
V2_UIDS = ["lab.ffn.1.0", "lab.ffn.1.1"]


def test_trainer_trains_through_two_natted_volunteers() -> None:
    skip_unless_lab()
    with tempfile.TemporaryDirectory() as homes, NatLab(n_lans=3, n_public=1) as lab:
        lab.block_between(2, 1)  # trainer's NAT <-> V2's NAT: no punch can land
        pub = lab.public[0]
        boot = lab.spawn_python(pub, VOLUNTEER, "--ip", pub.ip, "--home", f"{homes}/boot",
                                "--public", "yes", name="bootstrap")
        boot_ready = boot.wait_for("ready", 90)
        assert boot_ready["reachability"] == "public"
        baddr = boot_ready["addrs"][0]

        def volunteer(lan: int, uids: list[str], name: str):
            host = lab.private(lan)
            args = ["--ip", host.ip, "--home", f"{homes}/{name}", "--bootstrap", baddr]
            for uid in uids:
                args += ["--uid", uid]
            return lab.spawn_python(host, VOLUNTEER, *args, name=name)

        v1, v2 = volunteer(0, V1_UIDS, "v1"), volunteer(1, V2_UIDS, "v2")
        ready = {}
        for v in (v1, v2):
            ev = v.wait_for("ready", 150)
            assert ev["reachability"] == "private", ev
            assert ev["relay_addrs"] and ev["announced"], ev
            ready[v.name] = ev

        t_host = lab.private(2)
        trainer = lab.spawn_python(t_host, TRAINER, "--ip", t_host.ip, "--bootstrap", baddr,
                                   "--steps", str(STEPS), "--grid", "2", "2", name="trainer")
        joined = trainer.wait_for("joined", 120)
        assert joined["reachability"] == "private"
        assert trainer.wait_for("discovered", 120)["first_dim"] == [0, 1]
        done = trainer.wait_for("done", 240)

        # It trained: every step ran, all four experts answered, the loss fell.
        assert done["steps"] == STEPS and done["skipped"] == 0, done
        assert done["answered"] == sorted(V1_UIDS + V2_UIDS)
        assert done["last_loss"] < done["first_loss"]

        v1_id, v2_id = ready["v1"]["peer_id"], ready["v2"]["peer_id"]
        # V1: reached through the relay, then upgraded to a direct hole-punched connection
        # whose remote end is V1's NAT, and the expert RPC streams run over it.
        why = {k: done.get(k) for k in ("connect_kinds", "kinds", "nat", "rpc")}
        assert done["connect_kinds"][v1_id] == "hole_punched", why
        v1_conns = done["kinds"][v1_id]
        punched = [c for c in v1_conns if c[0] == "hole_punched"]
        assert punched and punched[0][2] == f"{lab.routers[0].wan_ip}:4001", v1_conns
        assert punched[0][1] >= 1  # open RPC streams on the direct connection
        # V2: hole punching impossible, so every connection (and its RPC traffic) is relayed.
        assert done["connect_kinds"][v2_id] == "relayed", why
        v2_conns = done["kinds"][v2_id]
        assert all(c[0] == "relayed" for c in v2_conns) and sum(c[1] for c in v2_conns) >= 1
        assert done["nat"]["hole_punches"] >= 1

        # Both volunteers did the work: every hosted expert applied updates.
        for v, uids in ((v1, V1_UIDS), (v2, V2_UIDS)):
            v.send({"cmd": "stats"})
            stats = v.wait_for("stats", 30)["experts"]
            for uid in uids:
                assert stats[uid]["updates_applied"] >= STEPS // 2, (v.name, stats)

        # The NATs saw it too: V1's NAT tracks the direct flow to the trainer's NAT.
        trainer_wan = lab.routers[2].wan_ip
        v1_lan = lab.private(0).ip
        assert f"src={v1_lan} dst={trainer_wan} sport=4001 dport=4001" in lab.conntrack(0)
        trainer.send({"cmd": "quit"})

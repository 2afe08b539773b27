"""``volunteer doctor`` behind a real NAT (network namespaces + iptables MASQUERADE).

A public bootstrap/relay node, a ``volunteer join`` daemon behind NAT 0 (reachable only
through the relay, so its record carries a circuit address), and the doctor run inside a
host behind NAT 1. The doctor must find: the bootstrap peer answering, this host *behind
NAT* (the dial-back over a fresh connection cannot pass the NAT; AutoNAT's reused
connection would have said "public"), a relay slot reserved on the bootstrap node (so the
node can serve: exit 0), and a hole punch offered by the NATed daemon and landed (DCUtR
through the relay to a direct connection between the two NATs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from tests.netlab.conftest import skip_unless_lab
from tests.netlab.daemons import spawn_daemon, wait_joined, write_manifest
from tests.netlab.lab import REPO_ROOT, NatLab

pytestmark = [pytest.mark.netlab, pytest.mark.timeout(300)]

BOOTSTRAP = "tests.netlab.dmoe_volunteer"


def test_doctor_behind_nat_finds_the_relay_and_tries_a_punch() -> None:
    skip_unless_lab()
    with tempfile.TemporaryDirectory(prefix="vdn") as tmp, NatLab(n_lans=2, n_public=1) as lab:
        pub = lab.public[0]
        boot = lab.spawn_python(pub, BOOTSTRAP, "--ip", pub.ip, "--home", f"{tmp}/boot",
                                "--public", "yes", name="bootstrap")
        baddr = boot.wait_for("ready", 90)["addrs"][0]
        manifest = write_manifest(tmp, baddr)
        v1 = spawn_daemon(lab, lab.private(0), manifest, f"{tmp}/v1", "v1", num_experts=2)
        snap = wait_joined({"v1": v1}, {"v1": f"{tmp}/v1"}, 150)["v1"][1]
        assert snap["network"]["reachability"] == "private", snap["network"]
        v1_id = snap["network"]["peer_id"]

        host = lab.private(1)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("VOLUNTEER_")},
               "PYTHONPATH": str(REPO_ROOT), "NO_COLOR": "1", "VOLUNTEER_LISTEN_HOST": host.ip}
        doctor = subprocess.run(["ip", "netns", "exec", host.ns, sys.executable, "-m", "volunteer", "doctor",
                                 str(manifest), "--home", f"{tmp}/d", "--json"],
                                capture_output=True, text=True, timeout=150, env=env, cwd=str(REPO_ROOT))
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
        assert checks["bootstrap"]["verdict"] == "ok", checks["bootstrap"]
        reach = checks["reachability"]
        assert reach["verdict"] == "warn" and reach["data"]["reachability"] == "private", reach
        assert reach["data"]["observed_ip"] == lab.routers[1].wan_ip  # the NAT's address, as peers see it
        assert "forward TCP port 4001" in reach["fix"]
        relay = checks["relay"]
        assert relay["verdict"] == "ok" and relay["data"]["relay"] == baddr, relay
        punch = checks["hole punch"]
        assert punch["verdict"] != "skip" and punch["data"]["peer"] == v1_id, punch  # offered by v1
        # NAT 0 and NAT 1 let a DCUtR punch through (as in test_daemons_through_nat.py): 4 of 4
        # runs here landed within the doctor's 15 s (punches take ~1 s, now and then ~10 s).
        assert punch["verdict"] == "ok" and "punched a direct connection" in punch["detail"], punch

"""Expert shards between NATed volunteer daemons: one relayed download, one hole-punched.

One lab, three NATs and a public bootstrap/relay node (``tests.netlab.dmoe_volunteer
--public yes``). The *holder* (``volunteer join`` behind NAT 0) starts first and hosts both
uids of a 1x2 grid from the deterministic init. Then two newcomers, one after the other,
each with ``--num-experts 1`` on a manifest with ``shards: {replication: 2}``: each must
take a uid the holder serves (below target) and download its shard (~2.1 MB in 33 chunks
of 64 KiB) over ``/volunteer/shard/1.0.0`` from the holder, the only source:

- newcomer A behind NAT 1, whose router drops all TCP to/from NAT 0 (``block_between``): no
  hole punch can land, the shard can only travel through the relay's circuit;
- newcomer B behind NAT 2 (no block): the relayed connection is upgraded by a DCUtR hole
  punch and the shard travels over the direct connection to NAT 0's public address.

B starts once A serves, so B sees A's uid at 2 replicas and takes the other one; neither
newcomer can have a source other than the holder. Each newcomer's status must show the
download done, every chunk from the holder, no bad source, and the holder's root for the
uid (the root commits to every byte; the shard bodies on disk are compared too). The path
is read from both ends: the daemon's ``network.peers`` and the routers' conntrack tables,
with byte accounting switched on in each router's namespace, so the flow that carried
the shard's bytes is visible (A: the flow to the relay, none to NAT 0; B: a flow to NAT 0's
WAN address at port 4001 carrying at least the shard).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.netlab.conftest import skip_unless_lab
from tests.netlab.conntrack import tcp_flows, with_peer
from tests.netlab.daemons import spawn_daemon, wait_joined
from tests.netlab.lab import LabProcess, NatLab
from volunteer.daemon.control_client import call

pytestmark = [pytest.mark.netlab, pytest.mark.timeout(300)]

BOOTSTRAP = "tests.netlab.dmoe_volunteer"
EXPERIMENT = "natshards"
UIDS = [f"{EXPERIMENT}.ffn.0", f"{EXPERIMENT}.ffn.1"]
PORT = 4001
MANIFEST = """\
experiment: {{name: {name}, version: "1", description: NAT lab shards, seed: 7}}
expert: {{kind: ffn, hidden_dim: 256}}
grid: {{prefix: {name}.ffn, dims: [2]}}
optimizer: {{name: adam, lr: 0.001}}
shards: {{replication: 2, chunk_bytes: 65536, rebalance_interval_s: 600, snapshot_interval_s: 600}}
network:
  bootstrap: ["{addr}"]
  relays: ["{addr}"]
  listen_port: {port}
  public: auto
"""
SERVE_TIMEOUT = 120.0


def snapshot(home: str) -> dict:
    """The daemon's status over its control socket ({} while it is not up)."""
    try:
        out = call(Path(home), "status", wait_s=10.0)
    except Exception:
        return {}
    return out if isinstance(out, dict) else {}


def serving(snap: dict) -> dict[str, dict]:
    hosted = (snap.get("shards") or {}).get("hosted") or {}
    return {u: h for u, h in hosted.items() if h.get("state") == "serving"}


def wait_serving(proc: LabProcess, home: str, count: int, timeout: float) -> tuple[float, float, dict]:
    """Poll until the daemon serves ``count`` uids: (s until status answered, s from then
    until serving, status)."""
    start = time.monotonic()
    up: float | None = None
    snap: dict = {}
    while True:
        if proc.popen.poll() is not None:
            tail = "\n".join(proc.stderr_tail[-30:])
            raise AssertionError(f"{proc.name} exited ({proc.popen.returncode}):\n{tail}")
        snap = snapshot(home)
        now = time.monotonic()
        if snap and up is None:
            up = now
        if up is not None and len(serving(snap)) >= count:
            return round(up - start, 2), round(now - up, 2), snap
        if now - start > timeout:
            tail = "\n".join(proc.stderr_tail[-30:])
            raise AssertionError(f"{proc.name} serves {sorted(serving(snap))} after {timeout:.0f}s; "
                                 f"shards: {snap.get('shards')}\nnetwork: {snap.get('network')}\n{tail}")
        time.sleep(0.2)  # poll interval of a condition with a deadline


def enable_conntrack_bytes(lab: NatLab) -> None:
    """Count bytes per flow in every router (``bytes=`` in its conntrack lines)."""
    for router in lab.routers:
        subprocess.run(["ip", "netns", "exec", router.ns, "sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1"],
                       check=True, capture_output=True, timeout=20)


def test_natted_newcomers_download_a_shard_relayed_and_hole_punched() -> None:
    skip_unless_lab()
    with tempfile.TemporaryDirectory(prefix="vns") as tmp, NatLab(n_lans=3, n_public=1) as lab:
        lab.block_between(1, 0)  # newcomer A's NAT <-> the holder's NAT: relay only
        enable_conntrack_bytes(lab)
        pub = lab.public[0]
        boot = lab.spawn_python(pub, BOOTSTRAP, "--ip", pub.ip, "--home", f"{tmp}/boot",
                                "--experiment", EXPERIMENT, "--public", "yes", name="bootstrap")
        baddr = boot.wait_for("ready", 90)["addrs"][0]
        manifest = Path(tmp) / "natshards.yaml"
        manifest.write_text(MANIFEST.format(name=EXPERIMENT, addr=baddr, port=PORT))
        homes = {"holder": f"{tmp}/holder", "a": f"{tmp}/a", "b": f"{tmp}/b"}

        # The holder: first in the swarm, both uids from the deterministic init.
        holder = spawn_daemon(lab, lab.private(0), manifest, homes["holder"], "holder", num_experts=2)
        h_snap = wait_joined({"holder": holder}, {"holder": homes["holder"]}, 150)["holder"][1]
        assert h_snap["network"]["reachability"] == "private", h_snap["network"]
        assert any("/p2p-circuit/" in a for a in h_snap["network"]["relay_addrs"]), h_snap["network"]
        _, _, h_snap = wait_serving(holder, homes["holder"], 2, SERVE_TIMEOUT)
        held = serving(h_snap)
        assert sorted(held) == UIDS, held
        assert all(h["weights_from"] == "fresh (deterministic init)" for h in held.values()), held
        holder_id = h_snap["network"]["peer_id"]

        # Newcomers, one after the other (B must see A's uid at target and take the other).
        timings: dict[str, tuple[float, float]] = {}
        snaps: dict[str, dict] = {}
        for name, lan in (("a", 1), ("b", 2)):
            proc = spawn_daemon(lab, lab.private(lan), manifest, homes[name], name, num_experts=1)
            up, ready_to_serving, snap = wait_serving(proc, homes[name], 1, SERVE_TIMEOUT)
            timings[name] = (up, ready_to_serving)
            snaps[name] = snap
        uid_of = {name: next(iter(serving(snaps[name]))) for name in snaps}
        assert sorted(uid_of.values()) == UIDS, uid_of

        downloads: dict[str, dict] = {}
        for name, snap in snaps.items():
            uid = uid_of[name]
            h = serving(snap)[uid]
            d = snap["shards"]["downloads"][uid]
            downloads[name] = d
            assert h["weights_from"].startswith("downloaded v0 from 1 holder"), (name, h)
            assert h["root"] == held[uid]["root"] and h["version"] == held[uid]["version"] == 0, (name, h)
            assert d["state"] == "done" and not d["error"], (name, d)
            assert d["chunks_total"] >= 32 and d["chunks_done"] == d["chunks_total"], (name, d)
            assert d["sources"] == {holder_id: d["chunks_total"]}, (name, d)
            assert not d["bad_sources"] and d["resumed_bytes"] == 0, (name, d)
            assert d["fetched_bytes"] == d["total_bytes"], (name, d)
            # Bitwise: the newcomer's shard on disk is the holder's.
            shard = f"cache/shards/{EXPERIMENT}"
            mine = [p for p in Path(homes[name], shard).iterdir() if p.name.startswith(h["root"])]
            theirs = [p for p in Path(homes["holder"], shard).iterdir() if p.name.startswith(h["root"])]
            assert len(mine) == len(theirs) == 1, (mine, theirs)
            assert (mine[0] / "body").read_bytes() == (theirs[0] / "body").read_bytes(), name
            assert (mine[0] / "header").read_bytes() == (theirs[0] / "header").read_bytes(), name

        # The paths, from the daemons' own counts and from the routers' conntrack tables.
        after = {name: snapshot(home) for name, home in homes.items()}
        holder_wan = lab.routers[0].wan_ip
        relay_ip = pub.ip
        peers_a = after["a"]["network"]["peers"]
        peers_b = after["b"]["network"]["peers"]
        flows_a = tcp_flows(lab.conntrack(1))
        flows_b = tcp_flows(lab.conntrack(2))
        report = {"timings (status up s, up->serving s)": timings,
                  "mb_per_s": {n: d["mb_per_s"] for n, d in downloads.items()},
                  "elapsed_s": {n: d["elapsed_s"] for n, d in downloads.items()},
                  "peers": {"a": peers_a, "b": peers_b},
                  "flows_a": flows_a, "flows_b": flows_b}
        print(report)
        total = downloads["a"]["total_bytes"]

        # A: relayed only. No flow to the holder's NAT ever got through A's router; the
        # relay flow carried the shard.
        assert peers_a["relayed"] >= 1 and peers_a["hole_punched"] == 0, report
        assert not with_peer(flows_a, holder_wan), report
        assert sum(f["bytes"] for f in with_peer(flows_a, relay_ip)) >= total, report

        # B: hole-punched. A direct flow between B's NAT and the holder's public address
        # (the holder's listen port kept by its MASQUERADE) carried the shard.
        assert peers_b["hole_punched"] >= 1, report
        direct_b = [f for f in with_peer(flows_b, holder_wan) if f["state"] == "ESTABLISHED"]
        assert direct_b, report
        assert any(PORT in (f["dport"], f["reply_sport"]) for f in direct_b), report
        assert sum(f["bytes"] for f in direct_b) >= total, report

        # The holder served every chunk: header + chunks_total per newcomer.
        served = after["holder"]["network"]["shard_server"]
        assert served["chunks"] >= downloads["a"]["chunks_total"] + downloads["b"]["chunks_total"], served

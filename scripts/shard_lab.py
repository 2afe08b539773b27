"""The NAT-lab part of ``bench_shards.py --netlab``: shard downloads through real NATs.

As root with ``ip`` and ``iptables`` (otherwise ``run_netlab`` says why and the loopback
figures stand alone), the download of ``bench_shards.py`` is measured through real NATs, in one lab of
tests/netlab/lab.py with the topology of ``tests/netlab/test_shards_through_nat.py``: a
public bootstrap/relay node, the holder daemon behind NAT 0 (both uids of a 1x2 grid,
replication 2), then a newcomer behind NAT 1 whose router drops all TCP to/from NAT 0
(``relayed``: the shard can only cross the relay's circuit) and a newcomer behind NAT 2
(``hole_punched``: DCUtR upgrades the relayed connection). Per path: shard download MB/s
(from the header to the last chunk), ``setup_s`` (connecting, waiting for a hole punch and
the header, before the first chunk), ``elapsed_s``, join -> serving seconds from spawning
``volunteer join``, and which path carried it: the newcomer's ``network.peers`` counts and
the routers' conntrack byte counts (flows to the holder's NAT vs to the relay). Then, in
the same lab with the daemons stopped, the plain libp2p rate on the same two paths: lab
nodes (tests/netlab/node.py) on the same hosts, ``echo`` ping-pong of 1 MiB messages over
one stream (MB/s counts both directions). The shard is ``netlab_mib`` of the preset (smoke
2 MiB, otherwise 16 MiB); the figures go under ``"netlab"`` in the JSON.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench_shards import hidden_for, serving

NETLAB_EXPERIMENT = "benchnat"
NETLAB_PORT = 4001  # the daemons' libp2p port (MASQUERADE keeps it: hole punching lands there)
NETLAB_ECHO_PORT = 4002  # the lab nodes' port for the plain-stream figures
NETLAB_ECHO_BYTES = 1 << 20
NETLAB_MANIFEST = """\
experiment: {{name: {name}, version: "1", description: bench_shards NAT lab, seed: 7}}
expert: {{kind: ffn, hidden_dim: {hidden}}}
grid: {{prefix: {name}.ffn, dims: [2]}}
optimizer: {{name: adam, lr: 0.001}}
serving: {{max_bytes: 1073741824, max_elements: 268435456}}
shards: {{replication: 2, rebalance_interval_s: 600, snapshot_interval_s: 600}}
network:
  bootstrap: ["{addr}"]
  relays: ["{addr}"]
  listen_port: {port}
  public: auto
"""
# newcomer label (the path its shard should take) -> the NAT it sits behind
NETLAB_PATHS = {"relayed": 1, "hole_punched": 2}


def path_verdict(peers: dict[str, int], direct_bytes: int, relay_bytes: int, total: int) -> tuple[str, str]:
    """Which path carried a download of ``total`` bytes: (from the NAT's conntrack byte counts,
    from the newcomer's ``network.peers`` counts)."""
    nat = "hole_punched" if direct_bytes >= total else "relayed" if relay_bytes >= total else "unclear"
    own = "hole_punched" if peers.get("hole_punched") else "relayed" if peers.get("relayed") else "direct"
    return nat, own


def netlab_echo(lab: Any, baddr: str, count: int) -> dict[str, Any]:
    """Plain libp2p rate on the two NAT paths: lab nodes on the holder's and the newcomers'
    hosts, one stream each, ``echo`` of ``count`` 1 MiB messages (MB/s both directions)."""
    def start(lan: int, name: str) -> Any:
        host = lab.private(lan)
        return lab.spawn_python(host, "tests.netlab.node", "--ip", host.ip, "--port", str(NETLAB_ECHO_PORT),
                                "--relay", baddr, name=name)

    def ask(proc: Any, cmd: dict[str, Any], reply: str, timeout: float = 120.0) -> dict[str, Any]:
        proc.send(cmd)
        return proc.wait_for(reply, timeout)

    nodes = {"holder": start(0, "echo-holder"), **{label: start(lan, f"echo-{label}")
                                                   for label, lan in NETLAB_PATHS.items()}}
    ready = {k: p.wait_for("ready", 90) for k, p in nodes.items()}
    target = ready["holder"]
    out: dict[str, Any] = {}
    for label in NETLAB_PATHS:
        proc = nodes[label]
        row: dict[str, Any] = {}
        try:
            got = ask(proc, {"cmd": "connect", "addrs": target["relay_addrs"]}, "connected")
            row["connect_kind"] = got["kind"]
            if label == "hole_punched":
                up = ask(proc, {"cmd": "upgrade", "peer": target["peer_id"], "timeout": 60}, "upgraded")
                row["punch_s"] = up["seconds"]
            echo = ask(proc, {"cmd": "echo", "peer": target["peer_id"], "size": NETLAB_ECHO_BYTES,
                              "count": count}, "echo", timeout=300)
            row.update({"kind": echo["kind"], "mb_per_s": echo["mb_per_s"], "rtt_ms_p50": echo["rtt_ms_p50"]})
        except Exception as e:  # optional figure: say why it is missing
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        out[label] = row
    for proc in nodes.values():
        with contextlib.suppress(Exception):
            proc.send({"cmd": "quit"})
    return out


def bench_netlab(tmp: Path, mib: float) -> dict[str, Any]:
    """The shard download through real NATs, relayed and hole-punched (see module docstring)."""
    from tests.netlab.daemons import spawn_daemon, wait_joined
    from tests.netlab.lab import NatLab
    from tests.netlab.test_shards_through_nat import (
        BOOTSTRAP,
        enable_conntrack_bytes,
        snapshot,
        tcp_flows,
        wait_serving,
        with_peer,
    )

    started = time.monotonic()
    serve_timeout = 120.0 + 10.0 * mib
    out: dict[str, Any] = {"shard_mib": None, "chunks": None, "paths": {}}
    with NatLab(n_lans=3, n_public=1) as lab:
        lab.block_between(1, 0)  # the relayed newcomer's NAT <-> the holder's NAT: relay only
        enable_conntrack_bytes(lab)
        pub = lab.public[0]
        boot = lab.spawn_python(pub, BOOTSTRAP, "--ip", pub.ip, "--home", str(tmp / "boot"),
                                "--experiment", NETLAB_EXPERIMENT, "--public", "yes", name="bootstrap")
        baddr = boot.wait_for("ready", 90)["addrs"][0]
        manifest = tmp / "natbench.yaml"
        manifest.write_text(NETLAB_MANIFEST.format(name=NETLAB_EXPERIMENT, hidden=hidden_for(mib), addr=baddr,
                                                   port=NETLAB_PORT))
        homes = {"holder": str(tmp / "holder"), **{label: str(tmp / label) for label in NETLAB_PATHS}}

        # The holder: first in the swarm behind NAT 0, both uids from the deterministic init.
        t0 = time.monotonic()
        daemons = {"holder": spawn_daemon(lab, lab.private(0), manifest, homes["holder"], "holder", num_experts=2)}
        wait_joined({"holder": daemons["holder"]}, {"holder": homes["holder"]}, 150)
        _, _, h_snap = wait_serving(daemons["holder"], homes["holder"], 2, serve_timeout)
        out["holder_join_to_serving_s"] = round(time.monotonic() - t0, 2)
        out["holder_reachability"] = h_snap["network"]["reachability"]
        held = serving(h_snap)
        holder_id = h_snap["network"]["peer_id"]

        # Newcomers one after the other: the second sees the first's uid at target and takes
        # the other one, so the holder is each one's only source.
        snaps: dict[str, dict[str, Any]] = {}
        for label, lan in NETLAB_PATHS.items():
            t0 = time.monotonic()
            daemons[label] = spawn_daemon(lab, lab.private(lan), manifest, homes[label], label, num_experts=1)
            up, _, snap = wait_serving(daemons[label], homes[label], 1, serve_timeout)
            snaps[label] = snap
            out["paths"][label] = {"nat": lan, "join_to_serving_s": round(time.monotonic() - t0, 2),
                                   "status_up_s": up}

        # The paths, from the newcomers' own counts and from their routers' conntrack tables
        # (collected before anything stops).
        after = {name: snapshot(home) for name, home in homes.items()}
        holder_wan, relay_ip = lab.routers[0].wan_ip, pub.ip
        for label, lan in NETLAB_PATHS.items():
            row = out["paths"][label]
            (uid, h), = serving(snaps[label]).items()
            d = (snaps[label]["shards"].get("downloads") or {}).get(uid) or {}
            total = int(d.get("total_bytes") or 0)
            flows = tcp_flows(lab.conntrack(lan))
            direct = sum(f["bytes"] for f in with_peer(flows, holder_wan))
            relayed = sum(f["bytes"] for f in with_peer(flows, relay_ip))
            peers = (after[label].get("network") or {}).get("peers") or {}
            by_nat, by_peers = path_verdict(peers, direct, relayed, total) if total else ("unclear", "unclear")
            row.update({
                "uid": uid, "weights_from": h.get("weights_from"), "same_root": h["root"] == held[uid]["root"],
                "download_mb_s": d.get("mb_per_s"), "setup_s": d.get("setup_s"), "elapsed_s": d.get("elapsed_s"),
                "total_bytes": total, "chunks": d.get("chunks_total"),
                "from_holder_only": d.get("sources") == {holder_id: d.get("chunks_total")},
                "peers": {k: int(v) for k, v in peers.items()},
                "nat_bytes_to_holder_nat": direct, "nat_bytes_to_relay": relayed,
                "carried_by_nat": by_nat, "carried_by_peers": by_peers,
                "carried_by": by_nat if by_nat != "unclear" else by_peers,
            })
            if total:
                out["shard_mib"], out["chunks"] = round(total / 2**20, 2), d.get("chunks_total")
        out["holder_shard_server"] = (after["holder"].get("network") or {}).get("shard_server")

        # Plain libp2p stream rate on the same paths, with the daemons gone (no CPU contention).
        for proc in daemons.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGTERM)
        for proc in daemons.values():
            proc.stop(20)
        out["echo"] = netlab_echo(lab, baddr, count=max(4, int(mib)))
        for label, row in out["paths"].items():
            e = out["echo"].get(label) or {}
            ok = e.get("mb_per_s") and row.get("download_mb_s") is not None and e.get("kind") == label
            row["download_over_echo"] = round(row["download_mb_s"] / e["mb_per_s"], 3) if ok else None
    out["wall_s"] = round(time.monotonic() - started, 1)
    return out


def run_netlab(tmp: Path, mib: float, quiet: bool) -> dict[str, Any]:
    """``bench_netlab`` where the lab can run; else ``{"skipped": why}`` (said on the console)."""
    from tests.netlab.lab import unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"bench_shards: netlab skipped: {reason}", file=sys.stderr if quiet else sys.stdout)
        return {"skipped": reason}
    try:
        return bench_netlab(tmp, mib)
    except Exception as e:
        print(f"bench_shards: netlab failed: {type(e).__name__}: {e}", file=sys.stderr)
        return {"error": f"{type(e).__name__}: {str(e)[:2000]}"}


def print_netlab(nl: dict[str, Any]) -> None:
    if "paths" not in nl:
        print(f"NAT lab: {nl.get('skipped') or nl.get('error')}")
        return
    print(f"NAT lab: shard {nl['shard_mib']} MiB in {nl['chunks']} chunks from the holder behind NAT 0 "
          f"(holder join -> serving {nl['holder_join_to_serving_s']} s; lab {nl['wall_s']} s)")
    print(f"  {'path':<14}{'MB/s':>8}{'setup s':>9}{'elapsed s':>11}{'join->serving s':>17}  "
          f"{'carried by (peers r/hp; NAT MB direct/relay)':<48}{'echo MB/s':>10}")
    for label, r in nl["paths"].items():
        e = nl["echo"].get(label) or {}
        echo = f"{e['mb_per_s']:.1f}" if "mb_per_s" in e else "n/a"
        if "mb_per_s" in e and e.get("kind") != label:
            echo += f" ({e.get('kind')})"
        peers = r["peers"]
        carried = (f"{r['carried_by']} ({peers.get('relayed', 0)}/{peers.get('hole_punched', 0)}; "
                   f"{r['nat_bytes_to_holder_nat'] / 1e6:.1f}/{r['nat_bytes_to_relay'] / 1e6:.1f})")
        if r["carried_by"] != label:
            carried += " !"
        print(f"  {label:<14}{r['download_mb_s'] or 0:>8.1f}{r['setup_s'] or 0:>9.2f}{r['elapsed_s'] or 0:>11.2f}"
              f"{r['join_to_serving_s']:>17.2f}  {carried:<48}{echo:>10}")
    for label, e in nl["echo"].items():
        if "error" in e:
            print(f"  echo {label}: {e['error']}")



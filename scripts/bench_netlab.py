"""NAT-lab benchmark: direct vs hole-punched vs relayed, and time to the first punch.

Builds the lab from tests/netlab/lab.py (network namespaces, MASQUERADE NATs): relay R and
public peer P on the "internet", peers A, B, C behind three NATs; C's NAT drops all TCP
to/from A's NAT so C <-> A can only go through the relay. Then measures, with the lab
node's echo protocol (one yamux stream over Noise, request/response ping-pong):

- round-trip latency (small messages) and throughput (large messages) for
  B -> P direct, B -> A hole-punched, C -> A relayed;
- time to the first hole-punched connection: from starting the peer processes to
  B holding a hole-punched connection to A (and the part after the relayed connect);
- join times on the product path, in the DMoE topology of tests/netlab/
  test_daemons_through_nat.py (bootstrap/relay public; volunteers V1, V2 behind NATs 0
  and 1: ``volunteer join`` daemons, or with ``--volunteers lab`` the lab's
  ``NetworkService`` + ``Runtime`` volunteer of test_dmoe_through_nat.py, which also
  reports its own clock; a trainer behind NAT 2 running ``ClientNode`` +
  ``DhtDirectory`` + ``RemoteMixtureOfExperts``, hole punching blocked between NATs 2 and
  1): volunteer ready (process start -> experts announced, reachability known), trainer
  joined (process start -> DHT joined, reachability known), discovered (-> experts found
  in the DHT), first training step (-> connected to both volunteers through punch/relay)
  and the whole short training run. Times are measured by the harness from spawning the
  process (so they include interpreter and torch import), except ``trainer_first_step_s``
  and ``*_own_s``: the process's own clock from its module import. Daemon ready times are
  polled with ``volunteer status --json`` (~1 s resolution).

Usage: ``sudo python scripts/bench_netlab.py --preset smoke|default [--netem "delay 5ms"]
[--volunteers daemon|lab]``.
Without root (or without ip/iptables) it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.netlab.daemons import spawn_daemon, wait_joined, write_manifest
from tests.netlab.lab import NatLab, unavailable_reason

PRESETS = {
    "smoke": {"trials": 1, "rtt_count": 20, "rtt_size": 64, "tput_count": 4, "tput_size": 256 << 10,
              "join_trials": 1, "join_steps": 5},
    "default": {"trials": 3, "rtt_count": 200, "rtt_size": 64, "tput_count": 16, "tput_size": 1 << 20,
                "join_trials": 3, "join_steps": 10},
}
NODE = "tests.netlab.node"
VOLUNTEER = "tests.netlab.dmoe_volunteer"
JOIN_KEYS = ("bootstrap_ready_s", "v1_ready_s", "v2_ready_s", "trainer_joined_s",
             "trainer_discovered_s", "trainer_first_step_s", "trainer_done_s", "v1_ready_own_s",
             "v2_ready_own_s")
TRAINER = "tests.netlab.dmoe_trainer"


def start(lab: NatLab, host, *args: str, name: str):
    return lab.spawn_python(host, NODE, "--ip", host.ip, *args, name=name)


def ask(proc, cmd: dict, reply: str, timeout: float = 120.0) -> dict:
    proc.send(cmd)
    return proc.wait_for(reply, timeout)


def trial(cfg: dict, netem: str | None, measure_paths: bool) -> dict:
    out: dict = {}
    with NatLab(n_lans=3, n_public=2, netem=netem) as lab:
        lab.block_between(2, 0)
        relay = start(lab, lab.public[0], "--allow-hop", "--assume-public", name="relay")
        raddr = relay.wait_for("ready", 60)["addrs"][0]
        t0 = time.monotonic()
        procs = {
            "p": start(lab, lab.public[1], "--relay", raddr, name="p"),
            "a": start(lab, lab.private(0), "--relay", raddr, name="a"),
            "b": start(lab, lab.private(1), "--relay", raddr, name="b"),
            "c": start(lab, lab.private(2), "--relay", raddr, name="c"),
        }
        ready = {k: p.wait_for("ready", 60) for k, p in procs.items()}
        out["ready_s"] = {k: v["seconds"] for k, v in ready.items()}
        a_id = ready["a"]["peer_id"]
        t_connect = time.monotonic()
        got = ask(procs["b"], {"cmd": "connect", "addrs": ready["a"]["relay_addrs"]}, "connected")
        assert got["kind"] == "relayed", got
        up = ask(procs["b"], {"cmd": "upgrade", "peer": a_id, "timeout": 60}, "upgraded")
        t_punched = time.monotonic()
        out["hole_punch_ok"] = up["kind"] == "hole_punched"
        out["start_to_first_punch_s"] = round(t_punched - t0, 3)
        out["relayed_connect_to_punch_s"] = round(t_punched - t_connect, 3)
        if not measure_paths:
            return out
        ask(procs["b"], {"cmd": "connect", "addrs": ready["p"]["addrs"]}, "connected")
        ask(procs["c"], {"cmd": "connect", "addrs": ready["a"]["relay_addrs"]}, "connected")
        paths = {"direct": (procs["b"], ready["p"]["peer_id"]),
                 "hole_punched": (procs["b"], a_id),
                 "relayed": (procs["c"], a_id)}
        for label, (proc, peer) in paths.items():
            rtt = ask(proc, {"cmd": "echo", "peer": peer, "size": cfg["rtt_size"],
                             "count": cfg["rtt_count"]}, "echo")
            tput = ask(proc, {"cmd": "echo", "peer": peer, "size": cfg["tput_size"],
                              "count": cfg["tput_count"]}, "echo", timeout=300)
            if rtt["kind"] != label or tput["kind"] != label:
                raise RuntimeError(f"{label} path used a {rtt['kind']}/{tput['kind']} connection")
            out[label] = {"rtt_ms_p50": rtt["rtt_ms_p50"], "rtt_ms_max": rtt["rtt_ms_max"],
                          "mb_per_s": tput["mb_per_s"]}
    return out


def start_volunteers(lab: NatLab, kind: str, homes: str, baddr: str) -> dict:
    """Start V1, V2 (``daemon``: ``volunteer join``; ``lab``: tests/netlab/dmoe_volunteer)
    and wait until both are NATed, relayed and announced; their ready times (s)."""
    out: dict = {}
    t0 = time.monotonic()
    if kind == "daemon":
        manifest = write_manifest(homes, baddr)
        dirs = {"v1": f"{homes}/v1", "v2": f"{homes}/v2"}
        procs = {name: spawn_daemon(lab, lab.private(lan), manifest, dirs[name], name)
                 for lan, name in ((0, "v1"), (1, "v2"))}
        for name, (waited, snap) in wait_joined(procs, dirs, 150).items():
            if snap["network"]["reachability"] != "private":
                raise RuntimeError(f"{name} not NATed: {snap['network']}")
            out[f"{name}_ready_s"] = waited  # polled via `volunteer status` (~1 s resolution)
        return out
    procs = {}
    for lan, name in ((0, "v1"), (1, "v2")):
        host = lab.private(lan)
        procs[name] = lab.spawn_python(
            host, VOLUNTEER, "--ip", host.ip, "--home", f"{homes}/{name}", "--bootstrap", baddr,
            "--uid", f"lab.ffn.{lan}.0", "--uid", f"lab.ffn.{lan}.1", name=name)
    for name, proc in procs.items():
        ev = proc.wait_for("ready", 150)
        if ev["reachability"] != "private" or not ev["announced"]:
            raise RuntimeError(f"{name} not ready as a NATed volunteer: {ev}")
        out[f"{name}_ready_s"] = round(time.monotonic() - t0, 3)  # observed in turn
        out[f"{name}_ready_own_s"] = ev.get("seconds")  # its own clock, from import
    return out


def join_trial(steps: int, netem: str | None, volunteers: str) -> dict:
    """Volunteer ready and trainer join/discovery times on the product path (see docstring)."""
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="vnl") as homes, \
            NatLab(n_lans=3, n_public=1, netem=netem) as lab:
        lab.block_between(2, 1)
        pub = lab.public[0]
        t0 = time.monotonic()
        boot = lab.spawn_python(pub, VOLUNTEER, "--ip", pub.ip, "--home", f"{homes}/boot",
                                "--public", "yes", name="bootstrap")
        baddr = boot.wait_for("ready", 90)["addrs"][0]
        out["bootstrap_ready_s"] = round(time.monotonic() - t0, 3)
        out.update(start_volunteers(lab, volunteers, homes, baddr))
        host = lab.private(2)
        t0 = time.monotonic()
        trainer = lab.spawn_python(host, TRAINER, "--ip", host.ip, "--bootstrap", baddr,
                                   "--steps", str(steps), "--grid", "2", "2", name="trainer")
        joined = trainer.wait_for("joined", 120)
        out["trainer_joined_s"] = round(time.monotonic() - t0, 3)
        found = trainer.wait_for("discovered", 120)
        out["trainer_discovered_s"] = round(time.monotonic() - t0, 3)
        done = trainer.wait_for("done", 240)
        out["trainer_done_s"] = round(time.monotonic() - t0, 3)
        out["trainer_first_step_s"] = done.get("first_step_s")  # trainer's own clock
        out["trainer_reachability"] = joined["reachability"]
        out["discovered_first_dim"] = found["first_dim"]
        out["steps"] = done["steps"]
        out["connect_kinds"] = sorted(done["connect_kinds"].values())
        trainer.send({"cmd": "quit"})
    return out


def medians(rows: list[dict]) -> dict:
    out = {}
    for key in JOIN_KEYS:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            out[key] = round(statistics.median(values), 3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--netem", default=None, help='e.g. "delay 10ms" on every NAT WAN link')
    parser.add_argument("--volunteers", choices=["daemon", "lab"], default="daemon",
                        help="join times with real `volunteer join` daemons (default) or the "
                             "lab's NetworkService+Runtime volunteer (tests/netlab/dmoe_volunteer)")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"bench_netlab: skipped: {reason}")
        return 0
    cfg = PRESETS[args.preset]
    started = time.monotonic()
    trials = [trial(cfg, args.netem, measure_paths=(i == 0)) for i in range(cfg["trials"])]
    joins = [join_trial(cfg["join_steps"], args.netem, args.volunteers)
             for _ in range(cfg["join_trials"])]
    first = trials[0]
    punch = [t["start_to_first_punch_s"] for t in trials if t["hole_punch_ok"]]
    after = [t["relayed_connect_to_punch_s"] for t in trials if t["hole_punch_ok"]]
    result = {
        "preset": args.preset, "netem": args.netem, "trials": len(trials),
        "hole_punch_success": f"{len(punch)}/{len(trials)}",
        "start_to_first_punch_s_median": round(statistics.median(punch), 3) if punch else None,
        "relayed_connect_to_punch_s_median": round(statistics.median(after), 3) if after else None,
        "node_ready_s": first["ready_s"],
        "paths": {k: first[k] for k in ("direct", "hole_punched", "relayed") if k in first},
        "volunteers": args.volunteers,
        "join": medians(joins),
        "join_trials": joins,
        "rtt_message_bytes": cfg["rtt_size"], "throughput_message_bytes": cfg["tput_size"],
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(f"{'path':<14}{'rtt p50 ms':>12}{'rtt max ms':>12}{'MB/s':>10}")
    for label, m in result["paths"].items():
        print(f"{label:<14}{m['rtt_ms_p50']:>12}{m['rtt_ms_max']:>12}{m['mb_per_s']:>10}")
    print(f"hole punch: {result['hole_punch_success']}, start->first punch "
          f"{result['start_to_first_punch_s_median']} s (relayed connect->punch "
          f"{result['relayed_connect_to_punch_s_median']} s)")
    print("join (median s): " + ", ".join(f"{k} {v}" for k, v in result["join"].items()))
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if punch and all(j["steps"] == cfg["join_steps"] for j in joins) else 1


if __name__ == "__main__":
    sys.exit(main())

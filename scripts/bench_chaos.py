"""Chaos benchmark: training through a swarm while volunteers are killed, frozen and cut off.

Real processes throughout: 4 ``volunteer join`` daemons (each in its own network namespace
on a bridge when run as root, else on loopback) and 2 trainer processes
(``chaos_trainer.py``: ``ClientNode`` + ``DhtDirectory`` + ``RemoteMixtureOfExperts``; one
calls experts over ZeroMQ, one over libp2p) train one model through the swarm. Phases:

1. ``calm``: no faults (the baseline, same processes, same run);
2. ``chaos``: every ``round_s`` one volunteer is killed -9 and restarted in its home (unless
   the last one killed is not serving again yet: then that kill is skipped and counted), one
   is SIGSTOPped for longer than the call timeout + slack, one link loses 20 % of its
   packets each way (``chaos_faults.py``, ``chaos_lab.py``: netem where the kernel has it,
   else iptables' random drop; none in a loopback lab, and the output says so);
3. ``after``: faults over, every restarted volunteer serving again.

Reported: trained steps/s per phase and ``chaos / calm``; lost updates (backward calls that
failed) per trainer; failed steps; every call's wall time against its deadline; restarts
(time to serving, what was resumed, updates rolled back); non-finite tensors in every
checkpoint after a graceful stop. Exit status 1 when a property fails: a call returned past
its deadline + ``SLACK_S`` + the time its trainer was kept off the CPU meanwhile (measured,
so a machine busier than its cores does not pass for a hang), a trainer hung or stopped training during chaos, an expert holds a
non-finite tensor, a restarted volunteer did not come back serving, a call failed with an
untyped error. Timings are reported, never judged.

    python scripts/bench_chaos.py --preset smoke|full [--json] [--loopback] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from chaos_faults import FaultScheduler  # noqa: E402
from chaos_lab import make_lab  # noqa: E402
from chaos_swarm import (  # noqa: E402
    EXPERIMENT,
    ZMQ_PORT,
    Volunteer,
    daemon_env,
    scan_checkpoints,
    serving_uids,
    write_manifest,
)

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"volunteers": 4, "trainers": 2, "dims": [4], "hidden": 32, "num_experts": 2, "replication": 2,
              "timeout": 2.0, "calm_s": 6.0, "chaos_s": 12.0, "after_s": 3.0, "round_s": 6.0, "loss_pct": 20.0},
    "full": {"volunteers": 4, "trainers": 2, "dims": [8], "hidden": 64, "num_experts": 4, "replication": 2,
             "timeout": 3.0, "calm_s": 45.0, "chaos_s": 180.0, "after_s": 30.0, "round_s": 8.0, "loss_pct": 20.0},
}
SLACK_S = 1.5  # a call returning later than its deadline + this is a hang
LOOKUP_TIMEOUT_S = 4.0


class Trainer:
    """A chaos_trainer.py process and the JSON events it printed."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.events: list[dict[str, Any]] = []
        self._stderr = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, env=daemon_env(), cwd=str(ROOT))
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    pass

    def steps(self) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("event") == "step"]

    def wait_trained(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(s["ok"] for s in self.steps()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} never trained a step (rc {self.proc.poll()}): "
                                   f"{self.steps()[-1:]}")
            time.sleep(0.1)

    def stop(self, timeout: float) -> dict[str, Any] | None:
        """Ask it to stop; its summary, or None if it did not finish within ``timeout``."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None
        self._pump.join(5)
        return next((e for e in self.events if e.get("event") == "summary"), None)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()


def phase_figures(steps: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    """Trained steps/s and lost updates among the steps that ended within [t0, t1)."""
    inside = [s for s in steps if t0 <= s["t1"] < t1]
    ok = sum(s["ok"] for s in inside)
    bwd_ok = sum(s.get("bwd_ok", 0) for s in inside)
    lost = sum(s.get("bwd_failed", 0) for s in inside)
    return {"steps_per_s": round(ok / (t1 - t0), 3) if t1 > t0 else None, "trained": ok,
            "failed_steps": len(inside) - ok, "backward_calls": bwd_ok + lost, "lost_updates": lost,
            "lost_fraction": round(lost / (bwd_ok + lost), 4) if bwd_ok + lost else 0.0,
            "max_step_s": round(max((s["t1"] - s["t0"] for s in inside), default=0.0), 3)}


def start_swarm(cfg: dict[str, Any], lab: Any, tmp: Path, start_trainers: Any) -> list[Volunteer]:
    """The first volunteer starts a swarm; the others and the trainers (``start_trainers``)
    start together from its address (process start-up is the slow part on a busy machine);
    returns once every volunteer serves and the grid is covered."""
    netns = lab.kind == "netns"
    manifest = write_manifest(tmp / "chaos.yaml", cfg["dims"], cfg["hidden"], cfg["replication"], netns,
                              public="yes")
    vols = []
    for i in range(cfg["volunteers"]):
        port = ZMQ_PORT if netns else free_port()
        vols.append(Volunteer(f"v{i}", lab.hosts[i], tmp / f"v{i}", manifest, lab.argv, cfg["num_experts"], port))
    vols[0].start([], new_swarm=True)
    vols[0].wait_serving(180)
    for v in vols[1:]:
        v.start([vols[0].addr or ""])
    start_trainers([vols[0].addr or ""])
    for v in vols[1:]:
        v.wait_serving(240)
    grid = {f"{EXPERIMENT}.ffn.{i}" for i in range(cfg["dims"][0])} if len(cfg["dims"]) == 1 else None
    deadline = time.monotonic() + 120
    while grid is not None and not grid <= set().union(*(serving_uids(v.status()) for v in vols)):
        if time.monotonic() > deadline:
            raise TimeoutError("the swarm never served every uid of the grid")
        time.sleep(0.5)
    return vols


def terminate_all(vols: list[Volunteer], timeout: float) -> dict[str, int | None]:
    """SIGTERM every volunteer at once (each checkpoints on the way out), then wait."""
    for v in vols:
        v.leave()
    return {v.name: v.terminate(timeout) for v in vols}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(cfg: dict[str, Any], tmp: Path, loopback: bool, quiet: bool) -> dict[str, Any]:
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    n_hosts = cfg["volunteers"] + cfg["trainers"]
    t_start = time.monotonic()
    with make_lab(n_hosts, want_netns=not loopback) as lab:
        say(f"lab: {lab.kind}; packet loss: {lab.loss_method or 'unavailable: ' + str(lab.loss_unavailable)}")
        vols: list[Volunteer] = []
        trainers: list[Trainer] = []
        try:
            def start_trainers(boots: list[str]) -> None:
                for j in range(cfg["trainers"]):
                    host = lab.hosts[cfg["volunteers"] + j]
                    argv = [sys.executable, str(ROOT / "scripts" / "chaos_trainer.py"), "--listen-host", host.ip,
                            "--dims", *map(str, cfg["dims"]), "--hidden", str(cfg["hidden"]), "--timeout",
                            str(cfg["timeout"]), "--lookup-timeout", str(LOOKUP_TIMEOUT_S), "--slack",
                            str(SLACK_S), "--seed", str(j), *[a for b in boots for a in ("--bootstrap", b)]]
                    argv += ["--libp2p"] if j % 2 else []
                    trainers.append(Trainer(f"t{j}-{'libp2p' if j % 2 else 'zmq'}", lab.argv(host, argv),
                                            tmp / f"t{j}.log"))

            vols = start_swarm(cfg, lab, tmp, start_trainers)
            say(f"swarm up in {time.monotonic() - t_start:.1f}s: " + ", ".join(
                f"{v.name}={sorted(serving_uids(v.status()))}" for v in vols))
            for t in trainers:
                t.wait_trained(180)
            say(f"trainers training after {time.monotonic() - t_start:.1f}s; calm phase {cfg['calm_s']}s")
            calm0 = time.monotonic()
            time.sleep(cfg["calm_s"])
            chaos0 = time.monotonic()
            # frozen well past deadline + slack: a call that waited for it would be flagged late
            sched = FaultScheduler(lab, vols, cfg["round_s"], cfg["timeout"] + SLACK_S + 2.0, cfg["loss_pct"],
                                   restart_timeout=240)
            say(f"chaos phase {cfg['chaos_s']}s: a round every {cfg['round_s']}s")
            sched.run(cfg["chaos_s"])
            chaos1 = time.monotonic()
            sched.wait_restarts()
            after0 = time.monotonic()
            say(f"restarts settled after {after0 - chaos1:.1f}s; after phase {cfg['after_s']}s")
            time.sleep(cfg["after_s"])
            after1 = time.monotonic()
            step_bound = 2 * LOOKUP_TIMEOUT_S + 3 * cfg["timeout"] + SLACK_S
            summaries = {t.name: t.stop(step_bound + 30) for t in trainers}
            finals = {v.name: v.status(wait_s=5) for v in vols}
            exits = terminate_all(vols, 30)
            scans = {v.name: scan_checkpoints(v.home) for v in vols}
        finally:
            for t in trainers:
                t.close()
            for v in vols:
                v.terminate(10)
    per_trainer = {}
    for t in trainers:
        steps = t.steps()
        per_trainer[t.name] = {
            "calm": phase_figures(steps, calm0, chaos0), "chaos": phase_figures(steps, chaos0, chaos1),
            "after": phase_figures(steps, after0, after1), "summary": summaries[t.name],
            "late_calls": [annotate(e, vols, sched) for e in t.events if e.get("event") == "late"][:20]}
        calm, chaos = per_trainer[t.name]["calm"]["steps_per_s"], per_trainer[t.name]["chaos"]["steps_per_s"]
        per_trainer[t.name]["chaos_over_calm"] = round(chaos / calm, 3) if calm else None
    volunteers = {name: {"exit": exits[name], "checkpoints": scans[name],
                         "updates_applied": sum(int(e.get("updates_applied") or 0)
                                                for e in ((finals[name] or {}).get("experts") or {}).values()),
                         "errors": ((finals[name] or {}).get("totals") or {}).get("errors")} for name in finals}
    return {"lab": lab.kind, "loadavg": [round(x, 1) for x in os.getloadavg()], "faults": sched.report(), "trainers": per_trainer, "volunteers": volunteers,
            "phases_s": {"calm": round(chaos0 - calm0, 1), "chaos": round(chaos1 - chaos0, 1),
                         "after": round(after1 - after0, 1)}, "wall_s": round(time.monotonic() - t_start, 1)}


def annotate(late: dict[str, Any], vols: list[Volunteer], sched: FaultScheduler) -> dict[str, Any]:
    """A late call with the volunteer it went to and the faults that volunteer had around it."""
    peer = str(late.get("peer", ""))
    who = next((v.name for v in vols if (v.endpoint and v.endpoint in peer)
                or (v.peer_id and v.peer_id[:16] in peer)), None)
    t0 = float(late.get("t0", 0.0))
    return {**late, "volunteer": who,
            "faults": sched.faults_near(who, t0, t0 + float(late.get("wall_s", 0))) if who else []}


def verdict(out: dict[str, Any]) -> list[str]:
    """The properties that failed (empty: all held)."""
    bad = []
    for name, t in out["trainers"].items():
        s = t["summary"]
        if s is None:
            bad.append(f"{name}: did not stop within its step bound (hung)")
            continue
        if s["late_calls"]:
            bad.append(f"{name}: {s['late_calls']} call(s) returned past deadline + {SLACK_S}s + the trainer's "
                       "own CPU stall")
        untyped = {k: v for k, v in s["calls"].items() if ":untyped:" in k}
        if untyped:
            bad.append(f"{name}: calls failed with untyped errors {untyped}")
        if t["chaos"]["trained"] == 0:
            bad.append(f"{name}: trained no step during chaos")
        if s["non_finite_loss"]:
            bad.append(f"{name}: {s['non_finite_loss']} non-finite losses")
    for name, v in out["volunteers"].items():
        ck = v["checkpoints"]
        if ck["non_finite"] or ck["unreadable"]:
            bad.append(f"{name}: checkpoints non-finite {ck['non_finite']} unreadable {ck['unreadable']}")
    f = out["faults"]
    if f["came_back"] < f["kills"]:
        bad.append(f"{f['kills'] - f['came_back']} restarted volunteer(s) not serving again: "
                   f"{[r for r in f['restarts'] if not r['came_back']]}")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    ap.add_argument("--json", action="store_true", help="print only the JSON figures")
    ap.add_argument("--loopback", action="store_true", help="no namespaces (no packet loss) even as root")
    ap.add_argument("--keep", action="store_true", help="keep the homes and logs (printed path)")
    args = ap.parse_args(argv)
    cfg = PRESETS[args.preset]
    tmp = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    try:
        out = {"preset": args.preset, **run(cfg, tmp, args.loopback, args.json)}
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    out["failures"] = verdict(out)
    if not args.json:
        print_summary(out)
        if args.keep:
            print(f"homes and logs kept in {tmp}")
    print(json.dumps(out))
    return 1 if out["failures"] else 0


def print_summary(out: dict[str, Any]) -> None:
    f = out["faults"]
    loss = f["loss_method"] or f"none ({f['loss_unavailable']})"
    print(f"chaos ({out['preset']}, {out['lab']}, load average {out['loadavg']}, {out['wall_s']}s): {f['rounds']} rounds, {f['kills']} kill -9, "
          f"{f['sigstops']} SIGSTOP (max {f['sigstop_s']}s), {f['loss_periods']} loss periods via {loss}")
    print(f"  restarted volunteers serving again: {f['came_back']}/{f['kills']} ({f['kills_skipped']} kills "
          "skipped while a restart was in progress), "
          f"time to serving {f['restart_to_serving_s']}, updates rolled back {f['updates_rolled_back']}")
    for name, t in out["trainers"].items():
        s = t["summary"] or {}
        print(f"  {name}: steps/s calm {t['calm']['steps_per_s']} chaos {t['chaos']['steps_per_s']} "
              f"after {t['after']['steps_per_s']} (chaos/calm {t['chaos_over_calm']}); lost updates "
              f"{t['chaos']['lost_updates']}/{t['chaos']['backward_calls']} in chaos, "
              f"{s.get('backward_failed')}/{(s.get('backward_failed') or 0) + (s.get('backward_answered') or 0)} "
              f"overall; late calls {s.get('late_calls')} ({s.get('late_calls_raw')} before discounting CPU stalls); worst wall/deadline {s.get('worst_wall_over_deadline')}")
    for name, v in out["volunteers"].items():
        print(f"  {name}: {v['checkpoints']['files']} checkpoints, non-finite {len(v['checkpoints']['non_finite'])}, "
              f"updates {v['updates_applied']}, exit {v['exit']}")
    print("FAILED: " + "; ".join(out["failures"]) if out["failures"] else "all properties held")


if __name__ == "__main__":
    sys.exit(main())

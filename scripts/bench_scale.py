"""Scale on one machine: N real ``volunteer join scale`` daemons in one swarm, one trainer.

Every daemon is a user's node at its default settings (self-benchmark included), in its own
home, with the peer network on loopback; the first starts a new swarm and every other one
joins through it (``--bootstrap``). Daemons start in waves (``--wave`` at a time, the next
wave once the previous one serves) so that a small machine is not asked to import torch N
times at once. Each hosts ``--experts`` tiny experts of ``configs/scale.yaml`` (ffn,
hidden 16, grid 16 x 16). Then a trainer-side ``ClientNode`` (DHT client, public API):

1. ``discoverable_s``: from the moment every daemon serves until every expert each daemon
   says it hosts (its ``status``) is found in the DHT with that daemon as a serving holder
   (``ClientNode.servers``), polled; also from the first spawn;
2. ``lookups``: every hosted uid looked up ``--rounds`` more times (a fresh lookup, no
   cache); success = a serving holder that really hosts it is returned. Must be 100%.
   ``resolve``: what a beam search's last step does, ``--rounds`` times: a fresh
   ``DhtDirectory`` resolves every hosted uid in one call. Must be 100% too;
3. ``train``: a ``RemoteMixtureOfExperts`` (beam search over a ``DhtDirectory``, k_best 4)
   takes ``--steps`` forward/backward steps through the swarm; every step must succeed;
4. ``memory``: RSS, USS (private) and PSS (shared pages split among their users) of every
   daemon, mean and max, and their PSS sum (what the daemons cost the machine together),
   once all serve and again after training; the machine's used memory (MemTotal -
   MemAvailable) before and after (only meaningful on an otherwise idle machine).

A daemon that exits before it serves is started again once, as a user would, and reported
under ``failed_starts`` (the run then still fails). The exit status is 1 unless every
daemon served at its first try, every expert was discoverable, every
lookup succeeded and every training step went through. Every daemon and home is removed at
the end, also on failure or Ctrl-C.

    python scripts/bench_scale.py --preset smoke|default|full [--json] [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_shards import daemon_status, env  # noqa: E402  (the same daemons, one way to run them)

# ``timeout_s`` only guards against a hung run: each daemon start costs ~5 s of CPU (importing
# torch and libp2p), so on a busy 2-core machine smoke takes minutes, not the ~40 s it takes
# on an idle one.
PRESETS = {
    "smoke": {"daemons": 6, "experts": 3, "wave": 3, "rounds": 2, "steps": 5, "timeout_s": 300},
    "default": {"daemons": 32, "experts": 3, "wave": 4, "rounds": 3, "steps": 10, "timeout_s": 1200},
    "full": {"daemons": 64, "experts": 3, "wave": 4, "rounds": 3, "steps": 10, "timeout_s": 2400},
}
EXPERIMENT = "scale"
RESTARTS = 1  # a daemon that exits before serving is started again once (counted, reported)
MIB = 2**20


class BenchError(Exception):
    """The run did not get what it measures (a daemon died, a deadline passed)."""


class Daemon:
    """One ``volunteer join scale`` process with its own home (logs next to it)."""

    def __init__(self, index: int, base: Path, *args: str) -> None:
        self.index = index
        self.home = base / f"v{index:03d}"
        self.log_path = base / f"v{index:03d}.log"
        self.args = args
        self.spawned = time.monotonic()
        self.serving_at: float | None = None
        self.snap: dict[str, Any] = {}
        self.failed_starts: list[str] = []  # why earlier tries exited (each was rerun once)
        self._spawn()

    def _spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "volunteer", "join", EXPERIMENT, "--home", str(self.home), *self.args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env())

    def status(self) -> dict[str, Any] | None:
        return daemon_status(self.home)

    def poll_serving(self) -> bool:
        """True once the node serves its experts and announced them (status refreshed)."""
        if self.proc.poll() is not None:
            why = f"exited with {self.proc.returncode}: {self.tail(1)}"
            if self.serving_at is not None or len(self.failed_starts) >= RESTARTS:
                raise BenchError(f"daemon {self.index} {why}\n{self.tail()}")
            self.failed_starts.append(why)  # as a user would: run `volunteer join` again
            self._spawn()
            return False
        snap = self.status()
        if snap is None or snap.get("state") != "serving" or not hosted(snap):
            return False
        net = snap.get("network") or {}
        if not net.get("announced_uids") or not net.get("last_announce_ok"):
            return False
        self.snap = snap
        if self.serving_at is None:
            self.serving_at = time.monotonic()
        return True

    @property
    def peer_id(self) -> str:
        return str(self.snap["network"]["peer_id"])

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def hosted(snap: dict[str, Any]) -> list[str]:
    return sorted(u for u, h in (snap.get("shards") or {}).get("hosted", {}).items() if h.get("state") == "serving")


def wait_until(cond: Any, deadline: float, what: str, every: float = 0.25) -> Any:
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(every)


def start_swarm(base: Path, cfg: dict[str, Any], deadline: float, quiet: bool, daemons: list[Daemon]) -> None:
    """Spawn the daemons in waves into ``daemons`` (the caller stops them whatever happens);
    returns once all serve, raises ``BenchError`` otherwise."""
    flags = ("--num-experts", str(cfg["experts"]))
    daemons.append(Daemon(0, base, "--new-swarm", *flags))
    wait_until(daemons[0].poll_serving, deadline, "the first daemon to serve")
    boot = daemons[0].snap["network"]["addrs"][0]
    while len(daemons) < cfg["daemons"]:
        wave = [Daemon(i, base, "--bootstrap", boot, *flags)
                for i in range(len(daemons), min(cfg["daemons"], len(daemons) + cfg["wave"]))]
        daemons.extend(wave)
        try:
            wait_until(lambda w=wave: all([d.poll_serving() for d in w]), deadline,
                       f"daemons {wave[0].index}-{wave[-1].index} to serve")
        except BenchError as exc:
            late = [d for d in wave if d.serving_at is None]
            raise BenchError(f"{exc}; last log lines of daemon {late[0].index}:\n{late[0].tail()}") from None
        if not quiet:
            print(f"  {len(daemons)}/{cfg['daemons']} daemons serving", flush=True)


def holders(daemons: list[Daemon]) -> dict[str, set[str]]:
    """uid -> peer ids of the daemons that say they host it (fresh status)."""
    out: dict[str, set[str]] = {}
    for d in daemons:
        d.poll_serving()  # refreshes d.snap while it serves
        for uid in hosted(d.snap):
            out.setdefault(uid, set()).add(d.peer_id)
    return out


LOOKUP_ERRORS: dict[str, int] = {}  # why lookups failed (type: message), reported with a timeout


def found(client: Any, uid: str, want: set[str]) -> set[str]:
    """The serving holders of ``uid`` in the DHT that really host it (empty on error, counted)."""
    try:
        entries = client.servers(uid)
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"[:200]
        LOOKUP_ERRORS[why] = LOOKUP_ERRORS.get(why, 0) + 1
        return set()
    return {e.peer_id for e in entries if e.state == "serving"} & want


def measure_discovery(client: Any, daemons: list[Daemon], deadline: float) -> dict[str, Any]:
    """Poll until every (uid, daemon) pair is found; returns seconds and pairs counted."""
    want = holders(daemons)
    missing = {(uid, p) for uid, peers in want.items() for p in peers}
    pairs, t0 = len(missing), time.monotonic()
    while missing:
        for uid in sorted({u for u, _ in missing}):
            got = found(client, uid, want[uid])
            missing -= {(uid, p) for p in got}
        if missing and time.monotonic() > deadline:
            raise BenchError(f"{len(missing)}/{pairs} (uid, daemon) pairs still not in the DHT, "
                             f"e.g. {sorted(missing)[:3]}; lookup errors: {LOOKUP_ERRORS or 'none'}")
        if missing:
            time.sleep(0.25)
    return {"pairs": pairs, "uids": len(want), "after_all_serving_s": round(time.monotonic() - t0, 2)}


def measure_lookups(client: Any, daemons: list[Daemon], rounds: int) -> dict[str, Any]:
    want = holders(daemons)
    ok, total, ms = 0, 0, []
    for _ in range(rounds):
        for uid in random.sample(sorted(want), len(want)):
            t0 = time.perf_counter()
            hit = found(client, uid, want[uid])
            ms.append((time.perf_counter() - t0) * 1e3)
            total += 1
            ok += bool(hit)
    ms.sort()
    return {"n": total, "ok": ok, "success": round(ok / total, 4) if total else 0.0,
            "p50_ms": round(ms[len(ms) // 2], 1) if ms else None,
            "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 1) if ms else None}


def measure_resolve(client: Any, daemons: list[Daemon], rounds: int) -> dict[str, Any]:
    """What a beam search's last step does: a fresh ``DhtDirectory`` (empty cache) resolves
    every hosted uid in one call (all parent prefixes looked up concurrently)."""
    want = sorted(holders(daemons))
    ok, total, ms = 0, 0, []
    for _ in range(rounds):
        directory = client.directory()
        try:
            t0 = time.perf_counter()
            got = directory.resolve(want)
            ms.append((time.perf_counter() - t0) * 1e3)
        except Exception:
            got = {}
        finally:
            directory.close()
        ok += len(set(got) & set(want))
        total += len(want)
    return {"n": total, "ok": ok, "success": round(ok / total, 4) if total else 0.0,
            "call_ms_max": round(max(ms), 1) if ms else None}


def dht_guard_totals(daemons: list[Daemon]) -> dict[str, int]:
    """Sum of the daemons' DHT guard counters (refusals explain failed lookups)."""
    out: dict[str, int] = {}
    for d in daemons:
        d.poll_serving()
        for key, value in ((d.snap.get("network") or {}).get("dht_guard") or {}).items():
            if isinstance(value, int) and not isinstance(value, bool):
                out[key] = out.get(key, 0) + value
    return out


def train(client: Any, steps: int) -> dict[str, Any]:
    """A few DMoE steps through the swarm (beam search over the DHT, k_best 4)."""
    import torch
    from torch import nn

    from volunteer.client.moe import RemoteMixtureOfExperts
    from volunteer.manifest import load_manifest

    m = load_manifest(EXPERIMENT)
    hidden, dims, prefix = m.expert.hidden_dim, list(m.grid.dims), m.grid.prefix
    directory = client.directory()
    torch.manual_seed(0)
    moe = RemoteMixtureOfExperts(hidden, dims, prefix, directory, k_best=4, k_min=1, forward_timeout=20.0,
                                 backward_timeout=20.0, timeout_after_k_min=2.0)
    model = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), moe, nn.Linear(hidden, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    times: list[float] = []
    answered: set[str] = set()
    errors: list[str] = []
    ok = 0
    try:
        for _ in range(steps):
            x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
            t0 = time.perf_counter()
            try:
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            times.append(time.perf_counter() - t0)
            ok += 1
            if moe.last_report is not None:
                answered |= set(moe.last_report.answered)
    finally:
        moe.close()
        directory.close()
    return {"steps": steps, "ok": ok, "step_s_median": round(statistics.median(times), 3) if times else None,
            "experts_answered": len(answered), "errors": errors[:3]}


def used_mib() -> float:
    import psutil

    vm = psutil.virtual_memory()
    return round((vm.total - vm.available) / MIB, 1)


def measure_memory(daemons: list[Daemon]) -> dict[str, Any]:
    from volunteer.daemon.footprint import measure

    rows = [measure(d.proc.pid) for d in daemons]

    def agg(key: str) -> dict[str, float]:
        xs = [float(r[key]) for r in rows]
        return {"mean": round(statistics.mean(xs), 1), "max": round(max(xs), 1), "sum": round(sum(xs), 1)}

    return {"rss_mib": agg("rss_mib"), "uss_mib": agg("uss_mib"), "pss_mib": agg("pss_mib"),
            "threads_mean": round(statistics.mean(r["threads"] for r in rows), 1)}


def stop_all(daemons: list[Daemon]) -> None:
    """SIGTERM every daemon at once, then SIGKILL the ones still running after 10 s."""
    for d in daemons:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10.0
    for d in daemons:
        try:
            d.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait(10)


def run(cfg: dict[str, Any], base: Path, quiet: bool) -> dict[str, Any]:
    from volunteer.client.node import ClientNode

    t_start = time.monotonic()
    deadline = t_start + cfg["timeout_s"]
    used_before = used_mib()
    daemons: list[Daemon] = []
    client = None
    try:
        start_swarm(base, cfg, deadline, quiet, daemons)
        all_serving = time.monotonic()
        if not quiet:
            print(f"  all {len(daemons)} serving after {all_serving - t_start:.1f}s; looking them up", flush=True)
        boot = daemons[0].snap["network"]["addrs"]
        client = ClientNode(EXPERIMENT, boot, listen_addrs=("/ip4/127.0.0.1/tcp/0",), nat=False).start()
        at_serving = measure_memory(daemons)
        disc = measure_discovery(client, daemons, deadline)
        disc["from_first_spawn_s"] = round(time.monotonic() - t_start, 2)
        lookups = measure_lookups(client, daemons, cfg["rounds"])
        resolved = measure_resolve(client, daemons, cfg["rounds"])
        trained = train(client, cfg["steps"])
        memory = {"serving": at_serving, "after_train": measure_memory(daemons)}
        memory["machine_used_mib"] = {"before": used_before, "after": used_mib()}
        joins = [d.serving_at - d.spawned for d in daemons if d.serving_at is not None]
        failed = [f"daemon {d.index}: {w}"[:400] for d in daemons for w in d.failed_starts]
        return {"daemons": len(daemons), "experts_per_daemon": cfg["experts"], "failed_starts": failed,
                "all_serving_s": round(all_serving - t_start, 2),
                "join_to_serving_s": {"mean": round(statistics.mean(joins), 2), "max": round(max(joins), 2)},
                "discoverable": disc, "lookups": lookups, "resolve": resolved, "train": trained,
                "dht_guard": dht_guard_totals(daemons), "memory": memory}
    finally:
        if client is not None:
            client.stop()
        stop_all(daemons)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    ap.add_argument("--daemons", type=int, help="override the preset's number of daemons")
    ap.add_argument("--timeout", type=float, help="override the preset's deadline for the whole run, s")
    ap.add_argument("--json", action="store_true", help="print only the JSON figures")
    ap.add_argument("--keep-logs", type=Path, metavar="DIR",
                    help="copy every daemon's log (vNNN.log) into DIR before the homes are removed")
    args = ap.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    if args.daemons:
        cfg["daemons"] = max(1, args.daemons)
    if args.timeout:
        cfg["timeout_s"] = args.timeout
    # A SIGTERM to the bench cleans up like Ctrl-C does (the finally clauses run).
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    base = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    out: dict[str, Any] = {"preset": args.preset}
    try:
        out.update(run(cfg, base, args.json))
    except BenchError as exc:
        out["error"] = str(exc)
    finally:
        if args.keep_logs is not None:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for path in base.glob("v*.log"):
                shutil.copy2(path, args.keep_logs / path.name)
        shutil.rmtree(base, ignore_errors=True)
    ok = ("error" not in out and not out["failed_starts"] and out["lookups"]["success"] == 1.0 and out["resolve"]["success"] == 1.0
          and out["train"]["ok"] == out["train"]["steps"])
    if not args.json:
        print_summary(out)
    print(json.dumps(out))
    return 0 if ok else 1


def print_summary(out: dict[str, Any]) -> None:
    if "error" in out:
        print(f"error: {out['error']}", file=sys.stderr)
        return
    d, lk, tr, mem = out["discoverable"], out["lookups"], out["train"], out["memory"]["after_train"]
    used = out["memory"]["machine_used_mib"]
    print(f"{out['daemons']} daemons x {out['experts_per_daemon']} experts: all serving after "
          f"{out['all_serving_s']:.1f}s (join -> serving mean {out['join_to_serving_s']['mean']:.1f}s)")
    for line in out["failed_starts"]:
        print(f"  a start failed and was rerun: {line}")
    print(f"  discoverable: {d['pairs']} (uid, daemon) pairs found {d['after_all_serving_s']:.1f}s after all "
          f"served ({d['from_first_spawn_s']:.1f}s after the first spawn)")
    print(f"  lookups: {lk['ok']}/{lk['n']} ({lk['success']:.2%}), p50 {lk['p50_ms']} ms, p99 {lk['p99_ms']} ms")
    rs = out["resolve"]
    print(f"  resolve (fresh DhtDirectory, all uids at once): {rs['ok']}/{rs['n']} ({rs['success']:.2%})")
    print(f"  train: {tr['ok']}/{tr['steps']} steps, median {tr['step_s_median']} s, "
          f"{tr['experts_answered']} experts answered" + "".join(f"\n    failed: {e}" for e in tr["errors"]))
    print(f"  memory per daemon after training: RSS {mem['rss_mib']['mean']:.0f} (max {mem['rss_mib']['max']:.0f}) MiB, "
          f"USS {mem['uss_mib']['mean']:.0f} (max {mem['uss_mib']['max']:.0f}), PSS {mem['pss_mib']['mean']:.0f} "
          f"(max {mem['pss_mib']['max']:.0f}); all daemons: PSS {mem['pss_mib']['sum'] / 1024:.2f} GiB; machine "
          f"used {used['before']:.0f} -> {used['after']:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())

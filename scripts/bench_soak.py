"""Soak benchmark: many clients against one node for minutes; memory stays flat, nothing
goes unanswered.

One real ``volunteer join`` daemon (network on, loopback) serves two ffn experts; client
processes (``soak_client.py``) run ``clients`` client threads in all, most over ZeroMQ and
some over libp2p streams, each looping over honest training requests mixed with hostile
ones (unknown uid, NaN, wrong shape, garbage, lying tensor specs, batches and messages over
the node's limits, backwards for unknown forwards). Meanwhile the daemon's RSS, open file
descriptors and threads are sampled (psutil).

Reported: requests answered per second; outcomes per request kind (``ok``, the typed error
code, ``closed`` for a connection the server dropped, ``timeout`` for no answer); latency of
honest requests; RSS at load start, after warm-up, peak and end; fds and threads at start
and end. Exit status 1 when a property fails: a request got no answer (``timeout``) or an
untyped failure, a kind ended in an outcome it must not (e.g. NaN accepted), a client
thread was stuck, the daemon died or stopped serving, or RSS grew from warm-up to the end
by more than ``max(RSS_BOUND_MIB, RSS_BOUND_FRACTION of warm)``. Timings are reported,
never judged.

    python scripts/bench_soak.py --preset smoke|medium|full [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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

from chaos_swarm import daemon_env, tail  # noqa: E402
from soak_client import EXPECTED  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # client processes: (threads, transport)
    "smoke": {"procs": [(6, "zmq"), (2, "libp2p")], "seconds": 20.0, "warm_s": 5.0, "sample_s": 0.5},
    "medium": {"procs": [(18, "zmq")] * 3 + [(10, "libp2p")], "seconds": 150.0, "warm_s": 20.0, "sample_s": 1.0},
    "full": {"procs": [(18, "zmq")] * 3 + [(10, "libp2p")], "seconds": 600.0, "warm_s": 30.0, "sample_s": 2.0},
}
HIDDEN = 64
MAX_BATCH = 256
MAX_BYTES = 8 * 2**20
RSS_BOUND_MIB = 64
RSS_BOUND_FRACTION = 0.2


def write_manifest(path: Path) -> Path:
    path.write_text(f"""
experiment: {{name: soak, version: "1", seed: 1}}
expert: {{kind: ffn, hidden_dim: {HIDDEN}}}
grid: {{prefix: soak.ffn, dims: [2]}}
optimizer: {{name: adam, lr: 0.0001}}
serving: {{max_batch_size: {MAX_BATCH}, max_bytes: {MAX_BYTES}, max_queued_bytes: {64 * 2**20}}}
network: {{public: "yes"}}
shards: {{replication: 1}}
""")
    return path


def start_daemon(tmp: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any], Path]:
    from volunteer.daemon.control_client import call

    home, log = tmp / "node", tmp / "node.log"
    manifest = write_manifest(tmp / "soak.yaml")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "volunteer", "join", str(manifest), "--home", str(home),
                                 "--new-swarm", "--device", "cpu", "--num-experts", "2", "--listen-host", "127.0.0.1",
                                 "--set", "selfbench=false", "--set", "torch_threads=1"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=daemon_env())
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited ({proc.returncode}): {tail(log)}")
        try:
            if json.loads((home / "control.json").read_text()).get("pid") == proc.pid:
                snap = call(home, "status", wait_s=5.0)
                hosted = (snap.get("shards") or {}).get("hosted") or {}
                if snap.get("state") == "serving" and len(hosted) == 2 and snap.get("network", {}).get("addrs"):
                    return proc, snap, home
        except (OSError, ValueError, Exception):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"daemon not serving within 300s: {tail(log)}")
        time.sleep(0.5)


class Sampler:
    """Samples a process's RSS, fds and threads every ``every`` seconds in a thread."""

    def __init__(self, pid: int, every: float) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.every = every
        self.samples: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            try:
                with self.proc.oneshot():
                    self.samples.append((time.monotonic() - t0, self.proc.memory_info().rss,
                                         self.proc.num_fds(), self.proc.num_threads()))
            except Exception:
                return  # the daemon is gone: the verdict says so
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def memory_figures(samples: list[tuple[float, int, int, int]], warm_s: float) -> dict[str, Any]:
    mib = 2**20
    if not samples:
        return {"samples": 0}
    warm = [s for s in samples if s[0] >= warm_s] or samples
    window = max(1, len(warm) // 10)
    warm_rss = statistics.median(s[1] for s in warm[:window])
    end_rss = statistics.median(s[1] for s in warm[-window:])
    bound = max(RSS_BOUND_MIB * mib, RSS_BOUND_FRACTION * warm_rss)
    slope = 0.0
    if len(warm) >= 2:  # least-squares trend after warm-up, MiB per minute
        ts, rs = [s[0] for s in warm], [s[1] / mib for s in warm]
        tm, rm = statistics.fmean(ts), statistics.fmean(rs)
        var = sum((t - tm) ** 2 for t in ts)
        slope = 60 * sum((t - tm) * (r - rm) for t, r in zip(ts, rs, strict=True)) / var if var else 0.0
    deciles = [round(samples[min(len(samples) - 1, len(samples) * k // 10)][1] / mib, 1) for k in range(11)]
    return {"samples": len(samples), "rss_start_mib": round(samples[0][1] / mib, 1),
            "rss_warm_mib": round(warm_rss / mib, 1), "rss_peak_mib": round(max(s[1] for s in samples) / mib, 1),
            "rss_end_mib": round(end_rss / mib, 1), "rss_growth_mib": round((end_rss - warm_rss) / mib, 1),
            "rss_bound_mib": round(bound / mib, 1), "rss_flat": end_rss - warm_rss <= bound,
            "rss_trend_mib_per_min": round(slope, 2), "rss_by_tenth_mib": deciles,
            "fds": [samples[0][2], samples[-1][2]], "threads": [samples[0][3], samples[-1][3]]}


def run(cfg: dict[str, Any], tmp: Path, quiet: bool) -> dict[str, Any]:
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    t_start = time.monotonic()
    proc, snap, home = start_daemon(tmp)
    clients: list[subprocess.Popen[str]] = []
    try:
        endpoint, uids = snap["endpoint"], sorted(snap["shards"]["hosted"])
        net = snap["network"]
        say(f"daemon serving {uids} at {endpoint} after {time.monotonic() - t_start:.1f}s")
        for i, (threads, kind) in enumerate(cfg["procs"]):
            argv = [sys.executable, str(ROOT / "scripts" / "soak_client.py"), "--endpoint", endpoint,
                    "--uid", uids[i % len(uids)], "--hidden", str(HIDDEN), "--threads", str(threads),
                    "--seconds", str(cfg["seconds"]), "--max-batch", str(MAX_BATCH), "--max-bytes",
                    str(MAX_BYTES), "--seed", str(i)]
            if kind == "libp2p":
                argv += ["--libp2p", net["peer_id"], *[a for addr in net["addrs"] for a in ("--addr", addr)]]
            clients.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(tmp / f"c{i}.log", "wb"),  # noqa: SIM115
                                            stdin=subprocess.DEVNULL, text=True, env=daemon_env()))
        for c in clients:  # load starts when every client process is up
            line = c.stdout.readline() if c.stdout else ""
            if '"ready"' not in line:
                raise RuntimeError(f"a soak client failed to start: {line!r}")
        n_clients = sum(t for t, _k in cfg["procs"])
        say(f"{n_clients} clients hammering for {cfg['seconds']:.0f}s")
        sampler = Sampler(proc.pid, cfg["sample_s"])
        t_load = time.monotonic()
        summaries = []
        for c in clients:
            out, _ = c.communicate(timeout=cfg["seconds"] + 120)
            summaries.append(next((json.loads(x) for x in out.splitlines() if '"summary"' in x), None))
        load_s = time.monotonic() - t_load
        sampler.stop()
        alive = proc.poll() is None
        after = after_check(endpoint, uids[0]) if alive else "daemon died"
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait(10)
        server_errors = None
        if proc.poll() is None:
            try:
                from volunteer.daemon.control_client import call

                server_errors = (call(home, "status", wait_s=10.0).get("totals") or {}).get("errors")
            except Exception:
                pass
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    outcomes: dict[str, int] = {}
    by_transport: dict[str, dict[str, int]] = {}
    for (_threads, kind), s in zip(cfg["procs"], summaries, strict=True):
        for k, v in (s or {}).get("outcomes", {}).items():
            outcomes[k] = outcomes.get(k, 0) + v
            by_transport.setdefault(kind, {})[k] = by_transport.get(kind, {}).get(k, 0) + v
    total = sum(outcomes.values())
    return {"clients": n_clients, "transports": {k: sum(t for t, kk in cfg["procs"] if kk == k) for k in ("zmq", "libp2p")},
            "load_s": round(load_s, 1), "requests": total, "requests_per_s": round(total / load_s, 1),
            "outcomes": dict(sorted(outcomes.items())),
            "by_transport": {k: dict(sorted(v.items())) for k, v in by_transport.items()},
            "loadavg": [round(x, 1) for x in os.getloadavg()], "latency_ms": [s.get("latency_ms") for s in summaries if s],
            "stuck_threads": sum((s or {}).get("stuck_threads", 0) for s in summaries),
            "missing_summaries": sum(s is None for s in summaries), "daemon_alive": alive,
            "after_soak": after, "server_errors": server_errors,
            "memory": memory_figures(sampler.samples, cfg["warm_s"]), "wall_s": round(time.monotonic() - t_start, 1)}


def after_check(endpoint: str, uid: str) -> str:
    """One honest forward after the soak: "ok" or what went wrong."""
    import torch

    from volunteer.client.remote_expert import RemoteExpert

    expert = RemoteExpert(uid, endpoint, timeout=60)
    try:
        with torch.no_grad():
            out = expert(torch.randn(4, HIDDEN))
        return "ok" if out.shape == (4, HIDDEN) and bool(torch.isfinite(out).all()) else "bad output"
    except Exception as e:
        return f"{type(e).__name__}: {e}"[:200]
    finally:
        expert.close()


def verdict(out: dict[str, Any]) -> list[str]:
    bad = []
    for key, n in out["outcomes"].items():
        kind, _, outcome = key.partition(":")
        if outcome == "timeout":
            bad.append(f"{n} {kind} request(s) got no answer")
        elif outcome.startswith("untyped"):
            bad.append(f"{n} {kind} request(s) failed untyped ({outcome})")
        elif outcome not in EXPECTED.get(kind, ()):
            bad.append(f"{n} {kind} request(s) ended '{outcome}' (expected one of {sorted(EXPECTED[kind])})")
    if out["stuck_threads"] or out["missing_summaries"]:
        bad.append(f"{out['stuck_threads']} client thread(s) stuck, {out['missing_summaries']} client(s) silent")
    if not out["daemon_alive"] or out["after_soak"] != "ok":
        bad.append(f"after the soak the node did not serve: {out['after_soak']}")
    mem = out["memory"]
    if not mem.get("rss_flat", False):
        bad.append(f"RSS grew {mem.get('rss_growth_mib')} MiB from warm-up to the end (bound {mem.get('rss_bound_mib')})")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="smoke")
    ap.add_argument("--json", action="store_true", help="print only the JSON figures")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        out = {"preset": args.preset, **run(PRESETS[args.preset], Path(tmp), args.json)}
    out["failures"] = verdict(out)
    if not args.json:
        m = out["memory"]
        print(f"soak ({args.preset}, load average {out['loadavg']}): {out['clients']} clients ({out['transports']}) for {out['load_s']}s: "
              f"{out['requests']} requests, {out['requests_per_s']}/s answered")
        for key, n in out["outcomes"].items():
            split = ", ".join(f"{t} {v[key]}" for t, v in out["by_transport"].items() if key in v)
            print(f"  {key:32s} {n:8d}  ({split})")
        print(f"  honest latency {out['latency_ms']}")
        print(f"  RSS start {m.get('rss_start_mib')} MiB, warm {m.get('rss_warm_mib')}, peak {m.get('rss_peak_mib')}, "
              f"end {m.get('rss_end_mib')} (growth {m.get('rss_growth_mib')}, bound {m.get('rss_bound_mib')}, "
              f"trend {m.get('rss_trend_mib_per_min')} MiB/min; by tenth of the run {m.get('rss_by_tenth_mib')}); "
              f"fds {m.get('fds')}, threads {m.get('threads')}; after the soak: {out['after_soak']}")
        print("FAILED: " + "; ".join(out["failures"]) if out["failures"] else "all properties held")
    print(json.dumps(out))
    return 1 if out["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

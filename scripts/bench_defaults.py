"""Benchmark 5 (issue 11): the daemon at its DEFAULT settings, from the outside, against plain
torch at its best thread count on the same machine, in one run.

- served: real ``volunteer join`` daemons (network_enabled=false, otherwise the volunteer's
  defaults; a manifest of ``ffn`` experts, 4 uids), each driven by ``clients`` client threads
  in one client process (the public client API: ``RemoteExpert`` over ``ZmqTransport``,
  forward+backward of a batch). One daemon runs at ``torch_threads=auto`` (the default);
  one more per explicit thread count, so the auto choice can be judged;
- local: plain torch forward+backward+Adam of the same expert module in a fresh process per
  thread count (1..cpus, or a spread of them on big machines); the best one is the baseline.

Phases run in interleaved rounds (the order rotates and alternates, so each phase takes each
position), all processes started once and idle while another phase measures; ratios are medians of per-round ratios against
the same round's best local figure. The target: served(auto) / local(best) >= 0.9.

    python scripts/bench_defaults.py --preset smoke|default|full [--json PATH]

The daemon at defaults reports the thread count it applied. The bench also runs the
self-benchmark's thread choice (``volunteer.experts.selfbench.cached_thread_choice``, what
``torch_threads = auto`` applies when the supervisor passes it) on this machine first, and
reports the served figure of the daemon at that explicit count.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(hidden=64, batch=16, experts=4, clients=4, seconds=0.5, rounds=1, sweep=False),
    "default": dict(hidden=1024, batch=256, experts=4, clients=4, seconds=5.0, rounds=4, sweep=True),
    "full": dict(hidden=1024, batch=256, experts=4, clients=4, seconds=10.0, rounds=6, sweep=True),
}
TARGET = 0.9
START_TIMEOUT_S = 180.0


# ---------------------------------------------------------------- the experiment's manifest

def write_manifest(path: Path, hidden: int, experts: int) -> None:
    """The demo manifest with ``experts`` ffn experts of width ``hidden`` and plain Adam (no
    clipping: the served work is exactly forward+backward+Adam, like the local baseline)."""
    import yaml

    from volunteer.manifest import load_manifest

    src = ROOT / "configs" / "demo.yaml"
    doc = yaml.safe_load(src.read_text())
    doc["experiment"]["name"] = "bench-defaults"
    doc["experiment"]["description"] = "bench_defaults.py: ffn experts served at daemon defaults"
    doc["expert"] = {"kind": "ffn", "hidden_dim": hidden}
    doc["grid"] = {"prefix": "bench.ffn", "dims": [experts]}
    doc["optimizer"] = {"name": "adam", "lr": 1e-4, "clip_grad_norm": None}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    load_manifest(str(path))  # fail here, with the loader's message, if the edit broke it


# ---------------------------------------------------------------- daemons

class Daemon:
    """One ``volunteer join`` process with its own home (defaults but ``network_enabled``)."""

    def __init__(self, name: str, manifest: Path, home: Path, extra: list[str]) -> None:
        self.name = name
        self.home = home
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOLUNTEER_")}
        env.update({"NO_COLOR": "1", "PYTHONUNBUFFERED": "1"})
        self.log_path = home.parent / f"{home.name}.log"
        home.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "volunteer", "join", str(manifest), "--home", str(home),
                 "--set", "network_enabled=false", *extra],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
        self.endpoint = ""
        self.uids: list[str] = []
        self.torch_threads = 0
        self.selfbench: Any = None

    def wait_ready(self, experts: int, timeout: float = START_TIMEOUT_S) -> None:
        """Until control.json is published and ``experts`` uids serve."""
        from volunteer.daemon.control_client import call

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon {self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            control = self.home / "control.json"
            if control.exists():
                try:
                    snap = call(self.home, "status", wait_s=10.0)
                except Exception:
                    snap = None
                if snap and snap.get("state") == "serving":
                    shards = snap.get("shards")
                    if isinstance(shards, dict):
                        uids = [u for u, h in (shards.get("hosted") or {}).items()
                                if h.get("state") == "serving"]
                    else:
                        uids = list(snap.get("experts") or {})
                    if len(uids) >= experts:
                        self.endpoint = json.loads(control.read_text())["endpoint"]
                        self.uids = sorted(uids)
                        self.torch_threads = int(snap["device"].get("torch_threads") or 0)
                        self.selfbench = snap.get("selfbench") or (snap.get("device") or {}).get("selfbench")
                        return
            time.sleep(0.1)
        raise RuntimeError(f"daemon {self.name} not serving within {timeout:.0f}s:\n"
                           f"{self.log_path.read_text()[-3000:]}")

    def terminate(self) -> None:
        """Ask for a graceful leave (SIGTERM); ``wait`` collects it."""
        if self.proc.poll() is None:
            self.proc.terminate()

    def wait(self) -> None:
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- local baseline workers

def _local_worker(conn: Any, threads: int, hidden: int, batch: int) -> None:  # subprocess
    import torch

    from volunteer.experts.backend import OptimizerSpec
    from volunteer.experts.registry import build_expert

    torch.set_num_threads(threads)
    module = build_expert("ffn", hidden)
    opt = OptimizerSpec("adam", 1e-4).build(list(module.parameters()))
    x = torch.randn(batch, hidden, requires_grad=True)
    g = torch.randn(batch, hidden)
    for _ in range(3):
        module(x).backward(g)
        opt.step()
    conn.send("ready")
    while True:
        seconds = conn.recv()
        if seconds is None:
            return
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or n < 3:
            opt.zero_grad(set_to_none=True)
            x.grad = None
            module(x).backward(g)
            opt.step()
            n += 1
        conn.send(n * batch / (time.perf_counter() - start))


class LocalWorker:
    """A spawned process running plain torch at ``threads`` intra-op threads."""

    def __init__(self, threads: int, hidden: int, batch: int) -> None:
        ctx = mp.get_context("spawn")
        self.threads = threads
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_local_worker, args=(child, threads, hidden, batch), daemon=True)
        self.proc.start()

    def wait_ready(self) -> None:
        if not self.conn.poll(START_TIMEOUT_S) or self.conn.recv() != "ready":
            raise RuntimeError(f"local worker ({self.threads} threads) did not start")

    def measure(self, seconds: float) -> float:
        self.conn.send(seconds)
        if not self.conn.poll(seconds * 20 + 120):
            raise RuntimeError("local baseline did not finish")
        return float(self.conn.recv())

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# ---------------------------------------------------------------- served throughput (clients)

def served(endpoint: str, uids: list[str], clients: int, batch: int, hidden: int, seconds: float) -> float:
    """Samples/s of forward+backward through ``RemoteExpert`` from ``clients`` threads.

    Runs for at least ``seconds`` and at least two calls per client; the rate is the calls
    completed over the time from the common start to the last of them (calls complete in
    bursts when the server batches them, so a fixed window would count whole bursts or none).
    """
    import torch

    from volunteer.client.remote_expert import RemoteExpert
    from volunteer.client.zmq_transport import ZmqTransport

    transport = ZmqTransport(endpoint)
    experts = [RemoteExpert(uid, transport, timeout=600) for uid in uids]
    finished: list[float] = []  # completion times (list.append is atomic)
    stop = threading.Event()
    errors: list[BaseException] = []
    started = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        expert = experts[i % len(experts)]
        x = torch.randn(batch, hidden, requires_grad=True)
        g = torch.randn(batch, hidden)
        try:
            expert(x).backward(g)  # warm-up (connection, first batch)
            started.wait()
            while not stop.is_set():
                expert(x).backward(g)
                finished.append(time.perf_counter())
        except BaseException as e:  # reported below
            errors.append(e)
            stop.set()
            started.abort()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        started.wait()
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    while not stop.is_set() and (time.perf_counter() - start < seconds or len(finished) < 2 * clients):
        time.sleep(0.01)
    done = list(finished)
    stop.set()
    for t in threads:
        t.join()
    transport.close()
    if errors:
        raise RuntimeError(f"client failed: {errors[0]!r}")
    return len(done) * batch / (done[-1] - start)


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--json", dest="json_path", help="write the results to this file")
    ap.add_argument("--keep", action="store_true", help="keep the daemons' homes and logs")
    ap.add_argument("--twin", action="store_true", help="a second daemon at defaults (auto2): "
                    "the spread between two identical daemons, to judge the noise")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    import torch

    torch.set_num_threads(1)  # the client threads only encode and decode
    from volunteer.daemon.hardware import usable_cpus

    cpus = usable_cpus()
    from volunteer.experts.selfbench import candidate_threads

    counts = candidate_threads(cpus)  # what torch_threads=auto chooses among
    h, batch, clients, secs = p["hidden"], p["batch"], p["clients"], p["seconds"]
    explicit = counts if p["sweep"] else []
    print(f"preset {args.preset}: ffn h={h} batch={batch} experts={p['experts']} clients={clients} "
          f"{secs:g}s/phase x {p['rounds']} rounds; {cpus} usable CPUs; local threads {counts}; "
          f"daemons: auto + torch_threads={explicit}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench-defaults-"))
    manifest = tmp / "manifest.yaml"
    write_manifest(manifest, h, p["experts"])
    daemons: dict[str, Daemon] = {}
    locals_: dict[int, LocalWorker] = {}
    results: dict[str, Any] = {"preset": args.preset, "params": p, "cpus": cpus,
                               "local_thread_counts": counts, "explicit_thread_counts": explicit}
    t_start = time.monotonic()
    # what the self-benchmark's thread choice (``torch_threads = auto`` with the measurement
    # wired in) picks here, measured before anything else runs: its row below is t<choice>
    from volunteer.experts.selfbench import cached_thread_choice

    pick = cached_thread_choice(tmp / "selfbench.json", "bench", "ffn", h, {}, min(256, batch), counts)
    results["selfbench_thread_choice"] = {"threads": pick["threads"],
                                          "rates": {str(n): r for n, r in pick["rates"].items()}}
    print(f"self-benchmark thread choice: {pick['threads']} (samples/s by threads: "
          + ", ".join(f"{n}: {r:,.0f}" for n, r in sorted(pick["rates"].items())) + ")", flush=True)
    try:
        t0 = time.monotonic()
        daemons["auto"] = Daemon("auto", manifest, tmp / "home-auto", [])
        # the defaults' daemon starts alone: its self-benchmark (which may time thread counts)
        # must not share the CPUs with other daemons starting up
        daemons["auto"].wait_ready(p["experts"])
        results["auto_start_s"] = round(time.monotonic() - t0, 2)
        if args.twin:
            daemons["auto2"] = Daemon("auto2", manifest, tmp / "home-auto2", [])
        for n in explicit:
            daemons[f"t{n}"] = Daemon(f"t{n}", manifest, tmp / f"home-t{n}",
                                      ["--set", f"torch_threads={n}"])
        for n in counts:
            locals_[n] = LocalWorker(n, h, batch)
        for d in daemons.values():
            d.wait_ready(p["experts"])
        for w in locals_.values():
            w.wait_ready()
        results["auto_torch_threads"] = daemons["auto"].torch_threads
        results["auto_selfbench"] = daemons["auto"].selfbench
        print(f"all up at {time.monotonic() - t_start:.1f} s; the default daemon applied torch_threads={daemons['auto'].torch_threads} "
              f"(started in {results['auto_start_s']} s)", flush=True)

        phases = [f"local{n}" for n in counts] + list(daemons)
        rounds: list[dict[str, float]] = []
        for i in range(p["rounds"]):
            r: dict[str, float] = {}
            shift = i % len(phases)  # every phase visits every position across rounds
            order = phases[shift:] + phases[:shift]
            for phase in order if i % 2 == 0 else order[::-1]:
                if phase.startswith("local"):
                    r[phase] = locals_[int(phase[5:])].measure(secs)
                else:
                    d = daemons[phase]
                    r[phase] = served(d.endpoint, d.uids, clients, batch, h, secs)
            r["local_best"] = max(r[f"local{n}"] for n in counts)
            rounds.append(r)
            print(f"round {i + 1}: " + "  ".join(f"{k}={v:,.0f}" for k, v in r.items()), flush=True)
    finally:
        print(f"measured at {time.monotonic() - t_start:.1f} s; stopping", flush=True)
        for w in locals_.values():
            w.stop()
        for d in daemons.values():
            d.terminate()
        for d in daemons.values():
            d.wait()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    results["wall_s"] = round(time.monotonic() - t_start, 1)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    def ratio(key: str, base: str = "local_best") -> float:
        return statistics.median(r[key] / r[base] for r in rounds)

    results["rounds"] = rounds
    results["local_samples_per_s"] = {str(n): med(f"local{n}") for n in counts}
    results["local_best_samples_per_s"] = med("local_best")
    results["local_best_threads"] = max(counts, key=lambda n: med(f"local{n}"))
    results["served_samples_per_s"] = {k: med(k) for k in daemons}
    results["ratio_served_vs_local"] = {k: ratio(k) for k in daemons}
    best_explicit = max(explicit, key=lambda n: med(f"t{n}")) if explicit else None
    results["best_explicit_threads"] = best_explicit
    results["ratio_auto_vs_best_explicit"] = ratio("auto", f"t{best_explicit}") if best_explicit else None
    auto = results["ratio_served_vs_local"]["auto"]
    results["target"] = TARGET
    results["target_met"] = auto >= TARGET

    print(f"\n{'measure':<48}{'samples/s':>12}{'/ local best':>14}")
    for n in counts:
        print(f"{'local torch, ' + str(n) + ' thread(s)':<48}{med(f'local{n}'):>12,.0f}"
              f"{statistics.median(r[f'local{n}'] / r['local_best'] for r in rounds):>14.3f}")
    print(f"{'served, daemon defaults (auto -> ' + str(results['auto_torch_threads']) + ')':<48}"
          f"{med('auto'):>12,.0f}{auto:>14.3f}")
    if "auto2" in daemons:
        print(f"{'served, a second daemon at defaults':<48}{med('auto2'):>12,.0f}"
              f"{results['ratio_served_vs_local']['auto2']:>14.3f}")
    for n in explicit:
        print(f"{'served, torch_threads=' + str(n):<48}{med(f't{n}'):>12,.0f}"
              f"{results['ratio_served_vs_local'][f't{n}']:>14.3f}")
    choice = results["selfbench_thread_choice"]["threads"]
    if f"t{choice}" in daemons:
        results["ratio_selfbench_choice_vs_local"] = ratio(f"t{choice}")
        results["ratio_selfbench_choice_vs_best_explicit"] = ratio(f"t{choice}", f"t{best_explicit}")
        print(f"self-benchmark choice (torch_threads={choice}): served/local(best) = "
              f"{results['ratio_selfbench_choice_vs_local']:.3f}, / best explicit = "
              f"{results['ratio_selfbench_choice_vs_best_explicit']:.3f}")
    vs_best = ("" if best_explicit is None else f"; auto / best explicit (torch_threads="
               f"{best_explicit}) = {results['ratio_auto_vs_best_explicit']:.3f}")
    print(f"served(defaults)/local(best) = {auto:.3f} (target >= {TARGET}: "
          f"{'met' if results['target_met'] else 'not met'}){vs_best}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the serving runtime (ZeroMQ frontend + batching + experts), one run, ratios
against baselines measured in the same run (these machines are noisy).

1. served forward+backward samples/s vs local torch forward+backward+optimizer step of the
   same expert and batch (ffn, 4 experts, 4 concurrent clients), activation cache on and off,
   in interleaved rounds with alternating phase order (the local baseline runs inside the idle
   server process: same process, same torch threads); ratios are medians of per-round ratios;
2. round-trip latency of forward+backward through the ``nop`` expert (median, p90);
3. throughput with 1, 4, 16, 64 concurrent clients (no collapse as clients grow).

The server runs in a subprocess (as a volunteer would), the clients are threads here.

    python scripts/bench_runtime.py --preset smoke|default|full|gpu [--json PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

PRESETS = {
    "smoke": dict(
        hidden=64,
        batch=16,
        experts=2,
        clients=2,
        seconds=1.0,
        rounds=1,
        rtt_iters=50,
        sweep=(1, 4),
        sweep_batch=8,
        threads=1,  # tiny ops: intra-op threads only add sync stalls on a busy 2-core machine
    ),
    "default": dict(
        hidden=1024,
        batch=256,
        experts=4,
        clients=4,
        seconds=3.0,
        rounds=5,
        rtt_iters=2000,
        sweep=(1, 4, 16, 64),
        sweep_batch=32,
    ),
    "full": dict(
        hidden=1024,
        batch=256,
        experts=4,
        clients=4,
        seconds=10.0,
        rounds=5,
        rtt_iters=4000,
        sweep=(1, 4, 16, 64),
        sweep_batch=32,
    ),
}


@dataclass
class ServerConfig:
    kind: str
    hidden: int
    experts: int
    cache: bool = True
    threads: int | None = None
    max_batch_size: int = 256
    uids: list[str] = field(default_factory=list)


def _serve(conn, cfg: ServerConfig) -> None:  # runs in the server subprocess
    from volunteer.experts.backend import ExpertBackend, OptimizerSpec
    from volunteer.runtime.limits import ServingLimits
    from volunteer.runtime.runtime import Runtime
    from volunteer.runtime.zmq_frontend import ZmqFrontend

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    backends = {
        uid: ExpertBackend(uid, cfg.kind, cfg.hidden, OptimizerSpec("adam", 1e-4))
        for uid in cfg.uids
    }
    limits = ServingLimits(
        max_batch_size=cfg.max_batch_size, activation_cache_size=64 if cfg.cache else 0
    )
    runtime = Runtime(backends, limits)
    runtime.start()
    frontend = ZmqFrontend(runtime)
    frontend.start()
    conn.send(frontend.endpoint)
    while True:  # commands: ("local", kind, hidden, batch, seconds) runs the baseline here; "stop"
        cmd = conn.recv()
        if cmd == "stop":
            break
        conn.send(local_baseline(*cmd[1:]))
    stats = runtime.stats()
    frontend.stop()
    runtime.stop()
    conn.send(stats)


class Server:
    """A runtime + frontend in a spawned subprocess."""

    def __init__(self, cfg: ServerConfig) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, cfg), daemon=True)
        self.proc.start()
        if not self.conn.poll(120):
            self.proc.kill()
            raise RuntimeError("benchmark server did not start")
        self.endpoint = self.conn.recv()
        self.stats: dict = {}

    def local_baseline(self, kind: str, hidden: int, batch: int, seconds: float) -> dict:
        """Run ``local_baseline`` inside the (idle) server process: same process, same threads."""
        self.conn.send(("local", kind, hidden, batch, seconds))
        if not self.conn.poll(seconds * 10 + 120):
            raise RuntimeError("local baseline did not finish")
        return self.conn.recv()

    def close(self) -> None:
        try:
            self.conn.send("stop")
            if self.conn.poll(30):
                self.stats = self.conn.recv()
        finally:
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()


def local_baseline(kind: str, hidden: int, batch: int, seconds: float) -> dict:
    """Samples per second and per CPU-second of plain torch forward+backward+Adam step on one
    expert module, in this process."""
    from volunteer.experts.backend import OptimizerSpec
    from volunteer.experts.registry import build_expert

    module = build_expert(kind, hidden)
    opt = OptimizerSpec("adam", 1e-4).build(
        list(module.parameters())
    )  # the optimizer the server uses
    x = torch.randn(batch, hidden, requires_grad=True)
    g = torch.randn(batch, hidden)
    for _ in range(2):
        module(x).backward(g)
        opt.step()
    n, start, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds or n < 3:
        opt.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(g)
        opt.step()
        n += 1
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return {"sps": n * batch / wall, "cpu_sps": n * batch / cpu}


def served_throughput(
    server: Server, uids: list[str], clients: int, batch: int, hidden: int, seconds: float
) -> dict:
    """Samples per second and per CPU-second (server + client processes) of forward+backward
    through RemoteExpert from ``clients`` threads."""
    import os

    endpoint = server.endpoint
    from volunteer.client.remote_expert import RemoteExpert
    from volunteer.client.zmq_transport import ZmqTransport

    transport = ZmqTransport(endpoint)
    experts = [RemoteExpert(uid, transport, timeout=120) for uid in uids]
    done = [0] * clients
    stop = threading.Event()
    errors: list[BaseException] = []
    started = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        expert = experts[i % len(experts)]
        x = torch.randn(batch, hidden, requires_grad=True)
        g = torch.randn(batch, hidden)
        try:
            expert(x).backward(g)  # warm-up
            started.wait()
            while not stop.is_set():
                expert(x).backward(g)
                done[i] += 1
        except BaseException as e:
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
    cpu0 = _cpu_s(server.proc.pid) + _cpu_s(os.getpid())
    counted0 = sum(done)
    while time.perf_counter() - start < seconds and not stop.is_set():
        time.sleep(0.05)
    total = sum(done) - counted0
    elapsed = time.perf_counter() - start
    cpu = _cpu_s(server.proc.pid) + _cpu_s(os.getpid()) - cpu0
    stop.set()
    for t in threads:
        t.join()
    transport.close()
    if errors:
        raise RuntimeError(f"client failed: {errors[0]!r}")
    return {"sps": total * batch / elapsed, "cpu_sps": total * batch / max(cpu, 1e-9)}


def _cpu_s(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def round_trip(
    endpoint: str,
    uid: str,
    hidden: int,
    batch: int,
    iters: int,
    server_pid: int,
    spin_s: float | None = None,
) -> dict:
    """Median/p90 ms of one forward+backward through the nop expert, one client, and the CPU
    time both processes spent per round trip (robust to other load on the machine).
    ``spin_s``: the transport's reply polling before it sleeps (None: its default)."""
    import os

    from volunteer.client.remote_expert import RemoteExpert
    from volunteer.client.zmq_transport import ZmqTransport

    transport = ZmqTransport(endpoint) if spin_s is None else ZmqTransport(endpoint, spin_s=spin_s)
    expert = RemoteExpert(uid, transport, timeout=30)
    x = torch.randn(batch, hidden, requires_grad=True)
    g = torch.randn(batch, hidden)
    for _ in range(10):
        expert(x).backward(g)
    times = []
    cpu0 = _cpu_s(os.getpid()) + _cpu_s(server_pid)
    for _ in range(iters):
        t0 = time.perf_counter()
        expert(x).backward(g)
        times.append((time.perf_counter() - t0) * 1e3)
    cpu_ms = (_cpu_s(os.getpid()) + _cpu_s(server_pid) - cpu0) * 1e3 / iters
    expert.transport.close()
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "cpu_ms_both_processes": cpu_ms,
        "iters": iters,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=[*sorted(PRESETS), "gpu"], default="default",
                    help="gpu: the GPU serving benchmark (scripts/bench_gpu.py, default preset; "
                    "says 'no GPU' and exits 0 where torch sees no CUDA device)")
    ap.add_argument("--json", dest="json_path", help="write the results to this file")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads in server and clients (default: the preset's, smoke: 1; else torch's)",
    )
    args = ap.parse_args(argv)
    if args.preset == "gpu":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_gpu

        return bench_gpu.main(["--preset", "default"]
                              + (["--json", args.json_path] if args.json_path else []))
    p = PRESETS[args.preset]
    if args.threads is None:
        args.threads = p.get("threads")
    h, batch, n_exp, n_cli, secs = p["hidden"], p["batch"], p["experts"], p["clients"], p["seconds"]
    uids = [f"bench.ffn.{i}" for i in range(n_exp)]
    if args.threads:
        torch.set_num_threads(args.threads)  # clients too
    results: dict = {
        "preset": args.preset,
        "params": dict(p, sweep=list(p["sweep"])),
        "torch_threads": torch.get_num_threads(),
    }
    print(
        f"preset {args.preset}: ffn h={h} batch={batch} experts={n_exp} clients={n_cli} {secs:.0f}s/phase x {p['rounds']} rounds"
    )

    servers = {
        c: Server(ServerConfig("ffn", h, n_exp, cache=c, threads=args.threads, uids=uids))
        for c in (True, False)
    }
    rounds: list[dict] = []
    phases = ["local", "cache_on", "cache_off"]
    try:  # interleaved rounds: these machines are noisy, so each ratio compares neighbours in time;
        # the phase order alternates (ABC, CBA, ...) so that a drift in load favours no phase
        for i in range(p["rounds"]):
            r = {}
            for phase in phases if i % 2 == 0 else phases[::-1]:
                if phase == "local":
                    r[phase] = servers[True].local_baseline("ffn", h, batch, secs)
                else:
                    r[phase] = served_throughput(
                        servers[phase == "cache_on"], uids, n_cli, batch, h, secs
                    )
            rounds.append(r)
    finally:
        for server in servers.values():
            server.close()
    results["rounds"] = rounds
    for key, name in (
        ("local", "local_samples_per_s"),
        ("cache_on", "served_samples_per_s_cache_on"),
        ("cache_off", "served_samples_per_s_cache_off"),
    ):
        results[name] = statistics.mean(r[key]["sps"] for r in rounds)
        results[name + "_cpu"] = statistics.mean(r[key]["cpu_sps"] for r in rounds)
    for cache, server in servers.items():
        results[f"cache_hits_{'on' if cache else 'off'}"] = sum(
            st.get("activation_cache", {}).get("hits", 0) for st in server.stats.values()
        )

    nop = Server(ServerConfig("nop", h, 1, threads=args.threads, uids=["bench.nop.0"]))
    try:
        # alternating halves, so that both variants see the same drift in machine load
        runs: dict[str, list[dict]] = {"nop_round_trip": [], "nop_round_trip_no_spin": []}
        for _ in range(2):
            for key, spin in (("nop_round_trip", None), ("nop_round_trip_no_spin", 0.0)):
                runs[key].append(
                    round_trip(
                        nop.endpoint, "bench.nop.0", h, 32, p["rtt_iters"] // 2, nop.proc.pid, spin
                    )
                )
        for key, halves in runs.items():
            results[key] = {k: statistics.mean(r[k] for r in halves) for k in halves[0]}
    finally:
        nop.close()

    sweep = {}
    server = Server(ServerConfig("ffn", h, n_exp, threads=args.threads, uids=uids))
    try:
        for c in p["sweep"]:
            sweep[str(c)] = served_throughput(server, uids, c, p["sweep_batch"], h, secs / 2)["sps"]
    finally:
        server.close()
    results["clients_sweep_samples_per_s"] = sweep
    results["clients_sweep_mean_batch"] = {
        uid: round(s["mean_batch_size"], 1) for uid, s in server.stats.items()
    }

    local = results["local_samples_per_s"]
    on, off = results["served_samples_per_s_cache_on"], results["served_samples_per_s_cache_off"]

    def ratio(a: str, b: str, kind: str = "sps") -> float:
        return statistics.median(r[a][kind] / r[b][kind] for r in rounds)

    results["ratio_served_vs_local"] = ratio("cache_on", "local")
    results["ratio_cache_off_vs_local"] = ratio("cache_off", "local")
    results["ratio_cache_on_vs_off"] = ratio("cache_on", "cache_off")
    # per CPU-second: robust to other load on a shared machine (server + client processes)
    results["cpu_ratio_served_vs_local"] = ratio("cache_on", "local", "cpu_sps")
    results["cpu_ratio_cache_on_vs_off"] = ratio("cache_on", "cache_off", "cpu_sps")
    first = sweep[str(p["sweep"][0])]
    results["ratio_sweep_max_vs_1_client"] = sweep[str(p["sweep"][-1])] / first

    print(f"{'measure':<44}{'value':>14}")
    rows = [
        ("local fwd+bwd+step samples/s", f"{local:,.0f}"),
        ("served samples/s (cache on)", f"{on:,.0f}"),
        ("served samples/s (cache off)", f"{off:,.0f}"),
        ("cache hits (on / off)", f"{results['cache_hits_on']} / {results['cache_hits_off']}"),
        (
            "ratio per round (served/local)",
            " ".join(f"{r['cache_on']['sps'] / r['local']['sps']:.2f}" for r in rounds),
        ),
        (
            "samples per CPU-s: local / served",
            f"{results['local_samples_per_s_cpu']:,.0f} / {results['served_samples_per_s_cache_on_cpu']:,.0f}",
        ),
        (
            f"nop fwd+bwd round trip median ms (b=32,h={h})",
            f"{results['nop_round_trip']['median_ms']:.3f}",
        ),
        ("nop fwd+bwd round trip p90 ms", f"{results['nop_round_trip']['p90_ms']:.3f}"),
        (
            "nop fwd+bwd CPU ms (client+server)",
            f"{results['nop_round_trip']['cpu_ms_both_processes']:.3f}",
        ),
        (
            "nop median ms / CPU ms, client never polls",
            f"{results['nop_round_trip_no_spin']['median_ms']:.3f} / "
            f"{results['nop_round_trip_no_spin']['cpu_ms_both_processes']:.3f}",
        ),
    ]
    rows += [
        (f"samples/s with {c} clients (batch {p['sweep_batch']})", f"{v:,.0f}")
        for c, v in sweep.items()
    ]
    for name, value in rows:
        print(f"{name:<44}{value:>14}")
    print(
        f"ratios: served/local={results['ratio_served_vs_local']:.3f} (target >= 0.9)  "
        f"cache-off/local={results['ratio_cache_off_vs_local']:.3f}  cache on/off={results['ratio_cache_on_vs_off']:.3f}  "
        f"{p['sweep'][-1]}/1 clients={results['ratio_sweep_max_vs_1_client']:.2f}\n"
        f"per CPU-second: served/local={results['cpu_ratio_served_vs_local']:.3f}  "
        f"cache on/off={results['cpu_ratio_cache_on_vs_off']:.3f}"
    )
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

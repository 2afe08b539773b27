"""GPU serving benchmark (issue 11): served / local throughput of ``ffn`` experts on a CUDA node.

For each config (hidden size, batch) a node (``Runtime`` + ``ZmqFrontend`` in a subprocess,
experts on the GPU, the daemon's default serving limits except the batch and activation
cache sizes the config needs) serves 4 experts to 4 trainer processes (one thread each,
``RemoteExpert`` forward+backward on CPU tensors, as a trainer elsewhere would send them),
once per wire format (fp32 and the 16-bit ones); the local baseline is plain torch on the
same GPU in the same (idle) server process: forward+backward+fused Adam of one expert with
the batch already on the device. Phases run in interleaved rounds; ratios are medians of
per-round ratios. Then the ``nop`` forward+backward round trip (1 x 32 x 1024) on a CUDA
node and, in the same run, on a CPU node.

Where torch sees no CUDA device it prints "no GPU: skipped" and exits 0.

    python scripts/bench_gpu.py --preset smoke|default|full [--json PATH] [--profile DIR]

Targets (issue 11, H100/H200): h=4096 batch 2048 with a 16-bit wire >= 0.8 of local;
h=1024 batch 256 >= 0.5; ``nop`` round trip on a CUDA node <= 1 ms.
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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PRESETS = {
    "smoke": dict(configs=[(256, 64)], wires=[None, "fp16"], seconds=1.0, rounds=1, rtt_iters=100),
    "default": dict(
        configs=[(1024, 256), (4096, 2048)], wires=[None, "fp16", "bf16"], seconds=3.0,
        rounds=2, rtt_iters=1000,
    ),
    "full": dict(
        configs=[(1024, 256), (4096, 2048)], wires=[None, "fp16", "bf16"], seconds=8.0,
        rounds=3, rtt_iters=3000,
    ),
}
EXPERTS = 4
CLIENTS = 4
TARGETS = {(4096, 2048): 0.8, (1024, 256): 0.5}
NOP_TARGET_MS = 1.0


@dataclass
class NodeConfig:
    kind: str
    hidden: int
    device: str
    batch: int
    uids: list[str] = field(default_factory=list)
    pipeline: bool | None = None


def _serve(conn, cfg: NodeConfig) -> None:  # the node subprocess
    from volunteer.daemon.hardware import apply_torch_threads
    from volunteer.experts.backend import ExpertBackend, OptimizerSpec

    apply_torch_threads("auto", device=cfg.device)  # what the daemon does at its default
    from volunteer.runtime.limits import ServingLimits
    from volunteer.runtime.pinned import frame_alloc_for
    from volunteer.runtime.runtime import Runtime
    from volunteer.runtime.zmq_frontend import ZmqFrontend

    backends = {
        uid: ExpertBackend(uid, cfg.kind, cfg.hidden, OptimizerSpec("adam", 1e-4), device=cfg.device)
        for uid in cfg.uids
    }
    # the manifest an experiment with experts this big would carry: batches of a whole
    # request, and room to cache every client's activations on a big GPU
    limits = ServingLimits(
        max_batch_size=max(256, cfg.batch), activation_cache_bytes=16 * 2**30
    )
    kwargs = {} if cfg.pipeline is None else {"pipeline": cfg.pipeline}
    runtime = Runtime(backends, limits, **kwargs)
    runtime.start()
    frontend = ZmqFrontend(runtime, alloc=frame_alloc_for(cfg.device))  # as the daemon does
    frontend.start()
    conn.send((frontend.endpoint, os.getpid()))
    while True:
        cmd = conn.recv()
        if cmd == "stop":
            break
        conn.send(local_baseline(*cmd[1:]))
    stats = runtime.stats()
    frontend.stop()
    runtime.stop()
    conn.send(stats)


def local_baseline(kind: str, hidden: int, batch: int, device: str, seconds: float) -> dict:
    """Samples/s of plain torch forward+backward+Adam on one expert, batch on ``device``."""
    from volunteer.experts.backend import OptimizerSpec
    from volunteer.experts.registry import build_expert

    module = build_expert(kind, hidden).to(device)
    opt = OptimizerSpec("adam", 1e-4).build(list(module.parameters()))
    x = torch.randn(batch, hidden, device=device, requires_grad=True)
    g = torch.randn(batch, hidden, device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(g)
        opt.step()

    for _ in range(5):
        step()
    _sync(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 5:
        for _ in range(10):
            step()
        n += 10
        _sync(device)
    return {"sps": n * batch / (time.perf_counter() - start)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class Node:
    """A serving node in a spawned subprocess."""

    def __init__(self, cfg: NodeConfig) -> None:
        ctx = mp.get_context("spawn")
        self.cfg = cfg
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, cfg), daemon=True)
        self.proc.start()
        if not self.conn.poll(300):
            self.proc.kill()
            raise RuntimeError("node did not start")
        self.endpoint, self.pid = self.conn.recv()
        self.stats: dict = {}

    def local(self, seconds: float) -> dict:
        c = self.cfg
        self.conn.send(("local", c.kind, c.hidden, c.batch, c.device, seconds))
        if not self.conn.poll(seconds * 10 + 300):
            raise RuntimeError("local baseline did not finish")
        return self.conn.recv()

    def close(self) -> None:
        try:
            self.conn.send("stop")
            if self.conn.poll(60):
                self.stats = self.conn.recv()
        finally:
            self.proc.join(20)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()


def _trainer(conn, endpoint: str, uid: str, hidden: int, batch: int, barrier, stop) -> None:
    """A trainer process: on ("run", wire), forward+backward until ``stop``; sends the count."""
    torch.set_num_threads(1)
    from volunteer.client.remote_expert import RemoteExpert

    x = torch.randn(batch, hidden, requires_grad=True)
    g = torch.randn(batch, hidden)
    while True:
        cmd = conn.recv()
        if cmd is None:
            return
        expert = RemoteExpert(uid, endpoint, timeout=300, compression=cmd[1])
        try:
            for _ in range(3):
                expert(x).backward(g)  # warm-up (connection, caches, CUDA kernels)
            barrier.wait()
            n = 0
            while not stop.is_set():
                expert(x).backward(g)
                n += 1
            conn.send(("ok", n))
        except BaseException as e:
            conn.send(("error", repr(e)))
            barrier.abort()
        finally:
            expert.close()


class Trainers:
    """``CLIENTS`` trainer processes, one per expert (round robin), reused across phases."""

    def __init__(self, node: Node, uids: list[str]) -> None:
        ctx = mp.get_context("spawn")
        self.barrier = ctx.Barrier(CLIENTS + 1)
        self.stop = ctx.Event()
        self.procs, self.conns = [], []
        c = node.cfg
        for i in range(CLIENTS):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_trainer,
                args=(child, node.endpoint, uids[i % len(uids)], c.hidden, c.batch,
                      self.barrier, self.stop),
                daemon=True,
            )
            p.start()
            self.procs.append(p)
            self.conns.append(parent)
        self.batch = c.batch

    def run(self, wire: str | None, seconds: float, profile: Path | None = None,
            pid: int | None = None) -> dict:
        self.stop.clear()
        self.barrier.reset()
        for conn in self.conns:
            conn.send(("run", wire))
        self.barrier.wait(timeout=600)
        start = time.perf_counter()
        smi = _gpu_busy_sampler()
        if profile is not None and pid is not None and shutil.which("py-spy"):
            subprocess.run(  # every thread, idle ones included: where does each one wait?
                ["py-spy", "record", "-p", str(pid), "-d", str(max(2, int(seconds))), "-r", "500",
                 "-f", "raw", "--threads", "--idle", "-o", str(profile), "--nonblocking"],
                capture_output=True, timeout=seconds + 60, check=False,
            )
        while time.perf_counter() - start < seconds:
            time.sleep(0.02)
        self.stop.set()
        elapsed = time.perf_counter() - start
        gpu_busy = _gpu_busy(smi)
        counts = [conn.recv() for conn in self.conns]
        bad = [c[1] for c in counts if c[0] != "ok"]
        if bad:
            raise RuntimeError(f"trainer failed: {bad[0]}")
        # trainers finish their call in flight after ``stop``: count whole calls in the window
        return {"sps": sum(c[1] for c in counts) * self.batch / elapsed, "gpu_busy_pct": gpu_busy}

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(20)
            if p.is_alive():
                p.kill()


def _gpu_busy_sampler() -> subprocess.Popen | None:
    """``nvidia-smi`` sampling the GPU's busy percentage every 100 ms (None without it)."""
    if not shutil.which("nvidia-smi"):
        return None
    return subprocess.Popen(
        ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
         "-lms", "100", "-i", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )


def _gpu_busy(proc: subprocess.Popen | None) -> float | None:
    """Mean busy percentage sampled by ``proc`` (stops it)."""
    if proc is None:
        return None
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    values = [float(v) for v in out.split() if v.strip().replace(".", "").isdigit()]
    return statistics.mean(values[1:] or values) if values else None


def round_trip(endpoint: str, uid: str, iters: int) -> dict:
    """Median/p90 ms of one forward+backward of 32 x 1024 through the ``nop`` expert."""
    from volunteer.client.remote_expert import RemoteExpert

    expert = RemoteExpert(uid, endpoint, timeout=60)
    x = torch.randn(32, 1024, requires_grad=True)
    g = torch.randn(32, 1024)
    for _ in range(20):
        expert(x).backward(g)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        expert(x).backward(g)
        times.append((time.perf_counter() - t0) * 1e3)
    expert.close()
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))]}


def _wire_name(wire: str | None) -> str:
    return wire or "fp32"


def bench_config(hidden: int, batch: int, p: dict, device: str, pipeline: bool | None,
                 profile_dir: Path | None) -> dict:
    """Interleaved rounds of local and served phases for one (hidden, batch) config."""
    from volunteer.wire.tensors import COMPRESSIONS

    wires = [w for w in p["wires"] if w in COMPRESSIONS]
    uids = [f"bench.ffn.{i}" for i in range(EXPERTS)]
    node = Node(NodeConfig("ffn", hidden, device, batch, uids, pipeline))
    trainers = Trainers(node, uids)
    rounds: list[dict] = []
    try:
        phases = ["local", *wires]
        for i in range(p["rounds"]):
            r: dict = {}
            for phase in phases if i % 2 == 0 else phases[::-1]:
                if phase == "local":
                    r["local"] = node.local(p["seconds"])
                else:
                    prof = None
                    if profile_dir is not None and i == 0:
                        prof = profile_dir / f"h{hidden}_b{batch}_{_wire_name(phase)}.txt"
                    r[_wire_name(phase)] = trainers.run(phase, p["seconds"], prof, node.pid)
            rounds.append(r)
    finally:
        trainers.close()
        node.close()
    out: dict = {"hidden": hidden, "batch": batch, "rounds": rounds,
                 "local_sps": statistics.mean(r["local"]["sps"] for r in rounds)}
    for w in map(_wire_name, wires):
        out[f"served_sps_{w}"] = statistics.mean(r[w]["sps"] for r in rounds)
        out[f"ratio_{w}"] = statistics.median(r[w]["sps"] / r["local"]["sps"] for r in rounds)
        busy = [r[w]["gpu_busy_pct"] for r in rounds if r[w].get("gpu_busy_pct") is not None]
        out[f"gpu_busy_pct_{w}"] = statistics.mean(busy) if busy else None
    out["mean_batch_rows"] = {
        uid: round(s.get("mean_batch_size", 0.0), 1) for uid, s in node.stats.items()
    }
    out["node_stats"] = node.stats
    return out


def bench_nop(iters: int, device: str, pipeline: bool | None) -> dict:
    out = {}
    for name, dev in (("cuda", device), ("cpu", "cpu")) if device != "cpu" else (("cpu", "cpu"),):
        node = Node(NodeConfig("nop", 1024, dev, 32, ["bench.nop.0"], pipeline))
        try:
            out[name] = round_trip(node.endpoint, "bench.nop.0", iters)
        finally:
            node.close()
    return out


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--json", dest="json_path", help="write the results to this file")
    ap.add_argument("--device", default="cuda:0", help="the node's device (default cuda:0)")
    ap.add_argument("--pipeline", choices=("auto", "on", "off"), default="auto",
                    help="the runtime's CUDA pipeline (default: the runtime's own choice)")
    ap.add_argument("--profile", type=Path, help="py-spy the node during each config's first round")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no GPU: skipped (torch sees no CUDA device)")
        if args.json_path:
            Path(args.json_path).write_text(json.dumps({"skipped": "no GPU"}))
        return 0
    p = PRESETS[args.preset]
    pipeline = {"auto": None, "on": True, "off": False}[args.pipeline]
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(torch.device(args.device)) if args.device != "cpu" else "cpu"
    results: dict = {"preset": args.preset, "card": card, "torch": torch.__version__,
                     "pipeline": args.pipeline, "configs": []}
    print(f"preset {args.preset} on {card} (torch {torch.__version__}), pipeline {args.pipeline}")
    for hidden, batch in p["configs"]:
        r = bench_config(hidden, batch, p, args.device, pipeline, args.profile)
        results["configs"].append(r)
        target = TARGETS.get((hidden, batch))
        wires = [k[len("ratio_"):] for k in r if k.startswith("ratio_")]
        line = "  ".join(
            f"{w} {r[f'served_sps_{w}']:,.0f}/s ({r[f'ratio_{w}']:.2f}, GPU busy "
            f"{_pct(r[f'gpu_busy_pct_{w}'])})" for w in wires)
        print(f"h={hidden} batch={batch}: local {r['local_sps']:,.0f}/s; served {line}"
              + (f"; target >= {target}" if target else ""))
    results["nop_round_trip"] = bench_nop(p["rtt_iters"], args.device, pipeline)
    nop = results["nop_round_trip"]
    print("nop fwd+bwd round trip (32x1024): " + ", ".join(
        f"{k} node {v['median_ms']:.3f} ms (p90 {v['p90_ms']:.3f})" for k, v in nop.items())
        + f"; target <= {NOP_TARGET_MS} ms on a CUDA node")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Benchmark: RemoteMixtureOfExperts training steps against real expert servers on loopback.

    python scripts/bench_moe.py --preset smoke|default [--latency-ms 20] [--json]

Starts ``--servers`` expert servers as subprocesses (this script with ``--serve``: a real
``Runtime`` + ``ZmqFrontend`` hosting a slice of the grid), then times forward+backward
steps of one mixture layer two ways:

- ``moe``: ``RemoteMixtureOfExperts`` (all expert calls of a step dispatched in parallel,
  forward and backward);
- ``sequential``: the same chosen experts called one by one as ``RemoteExpert`` modules
  under plain autograd (what a naive layer does: torch runs the backward nodes serially).

``--latency-ms`` adds a simulated one-way network delay to every request on the client
side (a sleeping Transport wrapper), which is where parallel dispatch matters: loopback has
almost no latency. Figures: mean step time, samples/s, experts called per step.

``OMP_WAIT_POLICY`` defaults to PASSIVE here (client and servers) unless already set: on a
2-core machine with several processes and call threads, OpenMP's default spin-waiting
starved the other threads (measured: default preset with 10 ms latency, 381 ms/step with
spinning vs 104 ms/step passive).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PRESETS = {
    "smoke": dict(servers=1, grid=(2, 2), hidden=32, batch=16, k_best=2, steps=10, warmup=3),
    "default": dict(servers=2, grid=(4, 4), hidden=256, batch=128, k_best=4, steps=20, warmup=3),
}


def serve(uids: list[str], hidden: int) -> None:
    """Host ``uids`` (ffn experts) until stdin closes; print the endpoint first."""
    from volunteer.experts.backend import ExpertBackend, OptimizerSpec
    from volunteer.runtime.limits import ServingLimits
    from volunteer.runtime.runtime import Runtime
    from volunteer.runtime.zmq_frontend import ZmqFrontend

    backends = {u: ExpertBackend(u, "ffn", hidden, OptimizerSpec(lr=1e-4)) for u in uids}
    runtime = Runtime(backends, ServingLimits())
    runtime.start()
    frontend = ZmqFrontend(runtime)
    frontend.start()
    print(frontend.endpoint, flush=True)
    try:
        sys.stdin.read()
    finally:
        frontend.stop()
        runtime.stop()


class DelayTransport:
    """Wraps a Transport; sleeps ``delay`` seconds before and after each request."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    def request(self, frames, timeout):
        time.sleep(self.delay)
        reply = self.inner.request(frames, timeout)
        time.sleep(self.delay)
        return reply

    def close(self):
        self.inner.close()


def _start_servers(n: int, uids: list[str], hidden: int) -> tuple[list[subprocess.Popen], list[str]]:
    procs, endpoints = [], []
    try:
        for i in range(n):
            part = uids[i::n]
            proc = subprocess.Popen(
                [sys.executable, __file__, "--serve", ",".join(part), "--hidden", str(hidden)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            procs.append(proc)
            line = proc.stdout.readline().strip() if proc.stdout else ""
            if not line.startswith("tcp://"):
                raise RuntimeError(f"expert server {i} failed to start (got {line!r})")
            endpoints.append(line)
    except BaseException:
        _stop_servers(procs)
        raise
    return procs, endpoints


def _stop_servers(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.stdin:
            proc.stdin.close()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _time_steps(step, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def bench(cfg: dict, latency_ms: float) -> dict:
    import itertools

    import torch

    from volunteer.client.beam_search import beam_search
    from volunteer.client.directory import StaticDirectory, make_uid
    from volunteer.client.moe import RemoteMixtureOfExperts
    from volunteer.client.remote_expert import RemoteExpert
    from volunteer.client.zmq_transport import ZmqTransport

    uids = [make_uid("bench.ffn", c) for c in itertools.product(*(range(d) for d in cfg["grid"]))]
    procs, endpoints = _start_servers(cfg["servers"], uids, cfg["hidden"])
    transports = [DelayTransport(ZmqTransport(e), latency_ms / 1000.0) for e in endpoints]
    directory = StaticDirectory({u: transports[i % len(endpoints)] for i, u in enumerate(uids)})
    torch.manual_seed(0)
    moe = RemoteMixtureOfExperts(cfg["hidden"], cfg["grid"], "bench.ffn", directory,
                                 k_best=cfg["k_best"], forward_timeout=60, backward_timeout=60)
    x = torch.randn(cfg["batch"], cfg["hidden"])
    try:
        def moe_step():
            xi = x.clone().requires_grad_(True)
            moe(xi).sum().backward()
            assert not moe.last_report.failed, moe.last_report.failed

        def sequential_step():
            xi = x.clone().requires_grad_(True)
            found = beam_search(moe.gate(xi), "bench.ffn", directory, moe.beam_size, cfg["k_best"])
            total = 0
            for uid, transport in found.transports.items():
                rows = [b for b, chosen in enumerate(found.uids) if uid in chosen]
                total = total + RemoteExpert(uid, transport, timeout=60)(xi[rows]).sum()
            total.backward()

        t_moe = _time_steps(moe_step, cfg["steps"], cfg["warmup"])
        calls = len(set(moe.last_report.answered))
        t_seq = _time_steps(sequential_step, cfg["steps"], cfg["warmup"])
    finally:
        moe.close()
        directory.close()
        for t in transports:
            t.close()
        _stop_servers(procs)
    mean_moe, mean_seq = sum(t_moe) / len(t_moe), sum(t_seq) / len(t_seq)
    return {
        "config": {**cfg, "grid": list(cfg["grid"]), "latency_ms": latency_ms,
                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")},
        "experts_per_step": calls,
        "moe_step_ms": round(mean_moe * 1000, 2),
        "moe_samples_per_s": round(cfg["batch"] / mean_moe, 1),
        "sequential_step_ms": round(mean_seq * 1000, 2),
        "sequential_samples_per_s": round(cfg["batch"] / mean_seq, 1),
        "speedup": round(mean_seq / mean_moe, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="RemoteMixtureOfExperts step benchmark")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--latency-ms", type=float, default=None,
                        help="simulated one-way latency per request (default: 0 smoke, 10 default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve.split(","), args.hidden)
        return 0
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
    latency = args.latency_ms if args.latency_ms is not None else (0.0 if args.preset == "smoke" else 10.0)
    result = bench(PRESETS[args.preset], latency)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark 2 (issue 11): the bulk path on CPU. Forward+backward of the ``nop`` expert with
16 MiB tensors through the runtime, in GB/s, against raw loopback TCP moving the same bytes,
in the same run; target >= 0.6 of raw.

- runtime: ``Runtime`` + ``ZmqFrontend`` (default ``ServingLimits``: 16 MiB per tensor is
  within them, so the server is not reconfigured) in a spawned subprocess; one client
  (``RemoteExpert`` over ``ZmqTransport``) calls forward then backward. Each call moves at least
  one tensor each way: 4 x 16 MiB per forward+backward (if a backward re-sends the inputs,
  those bytes are the runtime's cost, not counted as payload);
- raw: a plain TCP echo server in a spawned subprocess; the client ``sendall``s 16 MiB and
  ``recv_into``s the 16 MiB echo into a preallocated buffer, twice per iteration (the same 4 x
  16 MiB in two round trips); the server ``recv_into``s a preallocated buffer and ``sendall``s it.

Phases alternate in interleaved rounds (runtime, raw, raw, runtime, ...); the ratio is the
median of per-round ratios. ``--profile DIR`` records py-spy stacks of both runtime processes.

    python scripts/bench_bulk.py --preset smoke|default|full [--json PATH] [--mib N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(mib=16, seconds=0.5, rounds=1),
    "default": dict(mib=16, seconds=3.0, rounds=5),
    "full": dict(mib=16, seconds=8.0, rounds=7),
}
TARGET = 0.6
ROWS = 64  # the tensor is ROWS x (mib * 2**20 / 4 / ROWS) float32


# ---------------------------------------------------------------- servers (subprocesses)

def _runtime_server(conn: Any, hidden: int) -> None:
    from volunteer.experts.backend import ExpertBackend
    from volunteer.runtime.limits import ServingLimits
    from volunteer.runtime.runtime import Runtime
    from volunteer.runtime.zmq_frontend import ZmqFrontend

    runtime = Runtime({"bulk.nop.0": ExpertBackend("bulk.nop.0", "nop", hidden)}, ServingLimits())
    runtime.start()
    frontend = ZmqFrontend(runtime)
    frontend.start()
    conn.send(frontend.endpoint)
    conn.recv()  # "stop"
    frontend.stop()
    runtime.stop()


def _echo_server(conn: Any, nbytes: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(listener.getsockname()[1])
    sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(nbytes)
    view = memoryview(buf)
    while True:
        got = 0
        while got < nbytes:
            n = sock.recv_into(view[got:])
            if n == 0:
                return
            got += n
        sock.sendall(view)


class Proc:
    """A spawned subprocess that sends one value (endpoint or port) once it is ready."""

    def __init__(self, target: Any, *args: Any) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        if not self.conn.poll(120):
            self.proc.kill()
            raise RuntimeError(f"{target.__name__} did not start")
        self.address = self.conn.recv()

    def stop(self) -> None:
        try:
            self.conn.send("stop")
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# ---------------------------------------------------------------- clients (this process)

def runtime_phase(expert: Any, x: Any, g: Any, seconds: float) -> tuple[float, int]:
    """(seconds, iterations) of forward+backward through the runtime for ``seconds``."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 2:
        x.grad = None  # no 16 MiB gradient accumulation in the client: the path is measured
        expert(x).backward(g)
        n += 1
    return time.perf_counter() - start, n


def raw_phase(sock: socket.socket, out: memoryview, back: memoryview, seconds: float) -> tuple[float, int]:
    """(seconds, iterations) of two 16 MiB echo round trips for ``seconds``."""
    nbytes = out.nbytes
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 2:
        for _ in range(2):
            sock.sendall(out)
            got = 0
            while got < nbytes:
                k = sock.recv_into(back[got:])
                if k == 0:
                    raise RuntimeError("echo server closed")
                got += k
        n += 1
    return time.perf_counter() - start, n


def profile(pid: int, seconds: float, path: Path) -> subprocess.Popen[bytes]:
    """py-spy a process for ``seconds`` into collapsed stacks (``--format raw``; a flame graph
    tool or ``sort | uniq`` reads them); returns the running py-spy."""
    spy = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen([str(spy), "record", "--pid", str(pid), "--duration", str(int(seconds)),
                             "--rate", "250", "--native", "--format", "raw", "--output", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--json", dest="json_path", help="write the results to this file")
    ap.add_argument("--mib", type=int, help="tensor size in MiB (default: the preset's, 16)")
    ap.add_argument("--profile", metavar="DIR", help="py-spy the runtime phase of the last round "
                    "(server and client) into DIR/bulk-{server,client}.txt (collapsed stacks)")
    args = ap.parse_args(argv)
    p = dict(PRESETS[args.preset])
    if args.mib:
        p["mib"] = args.mib
    import torch

    from volunteer.client.remote_expert import RemoteExpert
    from volunteer.client.zmq_transport import ZmqTransport

    nbytes = p["mib"] * 2**20
    hidden = nbytes // 4 // ROWS
    print(f"preset {args.preset}: nop expert, {p['mib']} MiB tensors ({ROWS}x{hidden} float32), "
          f"{p['seconds']:g}s/phase x {p['rounds']} rounds", flush=True)
    server = Proc(_runtime_server, hidden)
    echo = Proc(_echo_server, nbytes)
    transport = ZmqTransport(server.address)
    expert = RemoteExpert("bulk.nop.0", transport, timeout=120)
    x = torch.randn(ROWS, hidden, requires_grad=True)
    g = torch.randn(ROWS, hidden)
    sock = socket.create_connection(("127.0.0.1", echo.address))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = memoryview(bytearray(torch.randn(nbytes // 4).numpy().tobytes()))
    back = memoryview(bytearray(nbytes))
    rounds: list[dict[str, float]] = []
    per_iter = 4 * nbytes
    try:
        y = expert(x)  # warm-up: connections, buffers, first batch; and a correctness check
        y.backward(g)
        if not (torch.equal(y, x) and torch.equal(x.grad, g)):
            raise RuntimeError("nop round trip changed the data")
        raw_phase(sock, out, back, 0.1)
        if bytes(back[:4096]) != bytes(out[:4096]):
            raise RuntimeError("echo changed the data")
        for i in range(p["rounds"]):
            r: dict[str, float] = {}
            spies = []
            if args.profile and i == p["rounds"] - 1:
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                spies = [profile(server.proc.pid, p["seconds"], Path(args.profile) / "bulk-server.txt"),
                         profile(os.getpid(), p["seconds"],
                                 Path(args.profile) / "bulk-client.txt")]
            for phase in ("runtime", "raw") if i % 2 == 0 else ("raw", "runtime"):
                if phase == "runtime":
                    secs, n = runtime_phase(expert, x, g, p["seconds"])
                else:
                    secs, n = raw_phase(sock, out, back, p["seconds"])
                r[phase] = per_iter * n / secs / 1e9
            for spy in spies:
                spy.wait(60)
            rounds.append(r)
            print(f"round {i + 1}: runtime {r['runtime']:.2f} GB/s  raw TCP {r['raw']:.2f} GB/s  "
                  f"ratio {r['runtime'] / r['raw']:.3f}", flush=True)
    finally:
        sock.close()
        transport.close()
        server.stop()
        echo.stop()
    ratio = statistics.median(r["runtime"] / r["raw"] for r in rounds)
    results = {
        "preset": args.preset, "params": p, "bytes_per_iteration": per_iter, "rounds": rounds,
        "runtime_gb_s": statistics.median(r["runtime"] for r in rounds),
        "raw_tcp_gb_s": statistics.median(r["raw"] for r in rounds),
        "ratio_runtime_vs_raw": ratio, "target": TARGET, "target_met": ratio >= TARGET,
    }
    print(f"runtime {results['runtime_gb_s']:.2f} GB/s, raw loopback TCP {results['raw_tcp_gb_s']:.2f} "
          f"GB/s: ratio {ratio:.3f} (target >= {TARGET}: {'met' if ratio >= TARGET else 'not met'})")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

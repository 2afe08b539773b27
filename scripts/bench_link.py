"""Benchmark 3: one trainer, one volunteer, a shaped home link (100 Mbit/s, 40 ms round trip).

Three network namespaces built here: the volunteer (a ``Runtime`` + ``ZmqFrontend`` serving
one ``ffn`` expert), the trainer (``RemoteExpert`` + ``InFlight``: forward+backward training
steps of micro-batches, ``--in-flight`` of them outstanding), and a router between them whose
two egress interfaces carry the link: 100 Mbit/s and 20 ms each way. With ``tc netem`` in the
kernel the router uses ``netem delay 20ms rate 100mbit`` (1000-packet queue, netem's default);
where the kernel has no netem (e.g. this project's Firecracker VMs: no CONFIG_NET_SCH_NETEM),
``tbf rate 100mbit`` (same queue size) shapes the rate and a delay line delays every forwarded
packet by 20 ms: an NFQUEUE rule in the router's FORWARD chain hands each packet's id to
``--role delay`` (this file), which accepts it 20 ms after it arrived (the packet itself stays
in the kernel). The output says which link was used and the round trip it measured.

Per wire format (fp32 and every compression in ``volunteer.wire.tensors.COMPRESSIONS``,
whatever it holds when this runs): samples/s the trainer gets, the link's bound for that
format (link rate / bytes per sample each way, bytes taken from the encoded requests and
replies of one micro-batch, headers included; forward input + backward gradient up, output
+ input gradient down), their ratio (target >= 0.85), and the gain over fp32. The volunteer's
local compute rate (forward+backward+Adam of the same micro-batch, measured before serving)
is reported too: where it is below the link's bound the run is compute-bound, not link-bound.
The trainer uses ``RemoteExpert``'s defaults, adaptive deadlines included: a step that fails
(e.g. cut by its deadline) is counted and reported, and the run goes on, as a trainer's would.

Presets: smoke (CI: a few seconds per format), default, full. ``--json PATH``. Needs root,
``ip``, ``tc`` and iptables' NFQUEUE (or netem); otherwise prints "no netem: skipped" and exits
0. Every namespace is deleted on exit, also after an error or Ctrl-C (and stale ones of a
killed run by the next run, as the NAT lab does).

    sudo python scripts/bench_link.py --preset smoke|default|full [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {  # step_kib: bytes each way of one micro-batch's step (forward + backward)
    "smoke": {"warmup": 1.0, "seconds": 2.0, "hidden": 32, "step_kib": 256, "in_flight": 8},
    "default": {"warmup": 3.0, "seconds": 10.0, "hidden": 32, "step_kib": 512, "in_flight": 12},
    "full": {"warmup": 5.0, "seconds": 30.0, "hidden": 32, "step_kib": 512, "in_flight": 16},
}
RATE_BIT = 100e6
ONE_WAY_MS = 20
QUEUE_PACKETS = 1000  # netem's default queue; the tbf queue holds as many full packets
TARGET = 0.85
SUBNETS = ("10.78.1", "10.78.2")  # volunteer side, trainer side; router .254 on both
PORT = 41000

# ------------------------------------------------------------------ the delay line (NFQUEUE)
_NFQ = 3 << 8  # NFNL_SUBSYS_QUEUE
_CFG, _VERDICT_BATCH, _PACKET = 2, 3, 0
_REQUEST, _ACK = 1, 4


def _nlmsg(kind: int, flags: int, queue: int, attrs: list[tuple[int, bytes]]) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue))
    for atype, payload in attrs:
        attr = struct.pack("=HH", 4 + len(payload), atype) + payload
        body += attr + b"\0" * (-len(attr) % 4)
    return struct.pack("=IHHII", 16 + len(body), kind, flags, 0, 0) + body


def delay_line(queue: int, delay_s: float) -> None:
    """Accept every packet of NFQUEUE ``queue`` ``delay_s`` after it arrived, in order (one
    batch verdict accepts all ids up to the newest due one)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
    sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
    sock.setsockopt(270, 5, 1)  # SOL_NETLINK, NETLINK_NO_ENOBUFS
    sock.bind((0, 0))
    sock.send(_nlmsg(_NFQ | _CFG, _REQUEST | _ACK, queue, [(1, struct.pack("=BxH", 1, 0))]))
    params = [(2, struct.pack(">IB", 0, 1)),  # copy mode META: ids only, no payload
              (3, struct.pack(">I", 65536)),  # queue length
              (4, struct.pack(">I", 4)), (5, struct.pack(">I", 4))]  # F_GSO: no segmenting
    sock.send(_nlmsg(_NFQ | _CFG, _REQUEST | _ACK, queue, params))
    for _ in range(2):  # the two acks
        reply = sock.recv(65536)
        err = struct.unpack_from("=i", reply, 16)[0] if len(reply) >= 20 else 0
        if struct.unpack_from("=H", reply, 4)[0] == 2 and err != 0:  # NLMSG_ERROR
            raise OSError(-err, f"nfqueue config: {os.strerror(-err)}")
    try:  # a wire must not wait for a CPU: run before the busy processes of this machine
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(-20)
    print(json.dumps({"event": "ready"}), flush=True)
    sock.setblocking(False)
    due: deque[tuple[float, int]] = deque()
    while True:
        select.select([sock], [], [], 0.1 if not due else max(0.0, due[0][0] - time.monotonic()))
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                break
            now = time.monotonic()
            pos = 0
            while pos + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, pos)
                if kind == _NFQ | _PACKET:
                    apos = pos + 20
                    while apos + 4 <= pos + length:
                        alen, atype = struct.unpack_from("=HH", data, apos)
                        if atype & 0x7FFF == 1 and alen >= 8:  # NFQA_PACKET_HDR
                            due.append((now + delay_s, struct.unpack_from(">I", data, apos + 4)[0]))
                            break
                        apos += (alen + 3) & ~3
                pos += max(16, (length + 3) & ~3)
        now = time.monotonic()
        last = None
        while due and due[0][0] <= now:
            last = due.popleft()[1]
        if last is not None:
            verdict = [(2, struct.pack(">II", 1, last))]  # NFQA_VERDICT_HDR: NF_ACCEPT, id
            sock.send(_nlmsg(_NFQ | _VERDICT_BATCH, _REQUEST, queue, verdict))


# ------------------------------------------------------------------ volunteer and trainer
def volunteer(hidden: int, micro_batches: list[int]) -> None:
    """Serve one ffn expert on 0.0.0.0:PORT; report local compute rates first."""
    import torch

    from volunteer.experts.backend import ExpertBackend, OptimizerSpec
    from volunteer.runtime.limits import ServingLimits
    from volunteer.runtime.runtime import Runtime
    from volunteer.runtime.zmq_frontend import ZmqFrontend

    torch.set_num_threads(1)  # tiny matrices: OpenMP teams only spin on a shared 2-core box
    torch.manual_seed(0)
    backend = ExpertBackend("link.0", "ffn", hidden, OptimizerSpec("adam", lr=1e-4))
    compute = {}
    probe = ExpertBackend("probe", "ffn", hidden, OptimizerSpec("adam", lr=1e-4))
    opt = torch.optim.Adam(probe.module.parameters(), 1e-4)
    for mb in sorted(set(micro_batches)):
        x = torch.randn(mb, hidden, requires_grad=True)
        probe.module(x).sum().backward()  # warm-up, not timed
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.5 or n < 3 * mb:
            y = probe.module(x)
            y.backward(torch.ones_like(y))
            opt.step()
            opt.zero_grad()
            n += mb
        compute[mb] = n / (time.perf_counter() - t0)
    runtime = Runtime({"link.0": backend}, ServingLimits(max_batch_size=65536))
    frontend = ZmqFrontend(runtime, bind=f"tcp://0.0.0.0:{PORT}")
    runtime.start()
    frontend.start()
    print(json.dumps({"event": "ready", "compute": compute}), flush=True)
    try:
        for _line in sys.stdin:  # each line asks for the runtime's stats; EOF stops
            st = runtime.stats()["link.0"]
            print(json.dumps({"event": "stats", "latency_ms": st["latency_ms"],
                              "mean_batch_size": st["mean_batch_size"]}), flush=True)
    finally:
        frontend.stop()
        runtime.stop()


def trainer(endpoint: str, hidden: int, plan: list[tuple[str, int]], in_flight: int,
            warmup: float, seconds: float) -> None:
    """For each (format, micro-batch): training steps through InFlight; print samples/s,
    the encoded bytes of one micro-batch's step each way and the link's round trip."""
    import torch

    from volunteer.client.inflight import InFlight
    from volunteer.client.remote_expert import RemoteExpert
    from volunteer.wire.messages import encode_request, encode_result

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        return out.float().pow(2).mean()

    torch.set_num_threads(1)
    for fmt, micro_batch in plan:
        compression = None if fmt == "fp32" else fmt
        x = torch.randn(micro_batch, hidden)
        up = sum(memoryview(f).nbytes for f in encode_request(
            "forward", "link.0", [x], request_id=1, timeout=1.0, compression=compression))
        up += sum(memoryview(f).nbytes for f in encode_request(
            "backward", "link.0", [x], request_id=2, timeout=1.0, forward_id=1,
            compression=compression, inputs_included=False))
        down = 2 * sum(memoryview(f).nbytes for f in encode_result(1, [x], compression))
        expert = RemoteExpert("link.0", endpoint, timeout=60.0, compression=compression)
        rtts = []
        for _ in range(5):
            t0 = time.perf_counter()
            expert.call("info", [])
            rtts.append(time.perf_counter() - t0)
        batches = [torch.randn(micro_batch, hidden) for _ in range(8)]
        done, marks, failed, why = 0, [], 0, None
        with InFlight(expert, max_in_flight=in_flight) as pipe:
            start = time.perf_counter()
            end = start + warmup + seconds
            window: deque = deque()
            i = 0
            while time.perf_counter() < end:
                if len(window) >= in_flight:
                    exc = window.popleft().exception()
                    if exc is None:
                        done += micro_batch
                        marks.append((time.perf_counter(), done))
                    else:  # e.g. cut by its adaptive deadline: count it, as a trainer would
                        failed, why = failed + 1, why or f"{type(exc).__name__}: {exc}"
                window.append(pipe.step(batches[i % len(batches)], loss_fn=loss_fn))
                i += 1
            for f in window:
                f.exception()
        measured = [(t, n) for t, n in marks if t >= start + warmup]
        rate = ((measured[-1][1] - measured[0][1]) / (measured[-1][0] - measured[0][0])
                if len(measured) >= 2 and measured[-1][0] > measured[0][0] else 0.0)
        expert.close()
        print(json.dumps({"event": "result", "format": fmt, "samples_per_s": rate,
                          "up_bytes": up, "down_bytes": down, "rtt_ms": 1000 * min(rtts),
                          "failed_steps": failed, "first_failure": why}),
              flush=True)


# ------------------------------------------------------------------ the harness
def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


class Link:
    """Volunteer <-> router <-> trainer namespaces; ``kind`` is "netem" or "tbf+delay line"."""

    def __init__(self) -> None:
        from tests.netlab.lab import reap_stale_labs

        reap_stale_labs()  # namespaces of runs killed before their teardown
        self.tag = f"vl{os.getpid()}x{int(time.time()) % 100000}"  # the NAT lab's pattern
        self.ns = {r: f"{self.tag}-{r}" for r in ("vol", "rtr", "trn")}
        self.kind = ""
        self.procs: list[subprocess.Popen] = []
        self.made: list[str] = []

    def sh(self, role: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run("ip", "netns", "exec", self.ns[role], *argv, check=check)

    def build(self, use_netem: bool, iptables: str | None) -> None:
        for ns in self.ns.values():
            _run("ip", "netns", "add", ns)
            self.made.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        rtr = self.ns["rtr"]
        for role, net, rif in (("vol", SUBNETS[0], "v0"), ("trn", SUBNETS[1], "t0")):
            _run("ip", "-n", self.ns[role], "link", "add", "eth0", "type", "veth", "peer",
                 "name", rif, "netns", rtr)
            _run("ip", "-n", self.ns[role], "addr", "add", f"{net}.1/24", "dev", "eth0")
            _run("ip", "-n", self.ns[role], "link", "set", "eth0", "up")
            _run("ip", "-n", self.ns[role], "route", "add", "default", "via", f"{net}.254")
            _run("ip", "-n", rtr, "addr", "add", f"{net}.254/24", "dev", rif)
            _run("ip", "-n", rtr, "link", "set", rif, "up")
            if use_netem:
                self.sh("rtr", "tc", "qdisc", "add", "dev", rif, "root", "netem", "delay",
                        f"{ONE_WAY_MS}ms", "rate", "100mbit", "limit", str(QUEUE_PACKETS))
            else:
                self.sh("rtr", "tc", "qdisc", "add", "dev", rif, "root", "tbf", "rate",
                        "100mbit", "burst", "64kb", "limit", str(QUEUE_PACKETS * 1514))
        self.sh("rtr", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        if use_netem:
            self.kind = "netem"
            return
        assert iptables is not None
        event(self.spawn("rtr", "delay", "0"), "ready", 30)  # before the rule: none dropped
        self.sh("rtr", iptables, "-A", "FORWARD", "-j", "NFQUEUE", "--queue-num", "0")
        self.kind = "tbf+delay line"

    def spawn(self, ns_role: str, *args: str) -> subprocess.Popen:
        """This script with ``--role *args`` in namespace ``ns_role`` (its own session)."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[ns_role], sys.executable, __file__, "--role", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(ROOT),
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)
        for ns in self.made:
            for pid in _run("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _run("ip", "netns", "del", ns, check=False)
        self.made.clear()


def event(proc: subprocess.Popen, name: str, timeout: float) -> dict:
    """The next JSON line ``{"event": name, ...}`` the process prints (RuntimeError if none)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited ({proc.wait()}) before {name!r}")
        if line.startswith("{"):
            got = json.loads(line)
            if got.get("event") == name:
                return got
    raise RuntimeError(f"no {name!r} within {timeout:.0f} s")


def why_not() -> tuple[str | None, bool, str | None]:
    """(reason this cannot run or None, netem available, iptables binary for NFQUEUE)."""
    if os.geteuid() != 0:
        return "needs root", False, None
    if not all(_which(b) for b in ("ip", "tc")):
        return "needs ip and tc (iproute2)", False, None
    ns = f"vl{os.getpid()}x0-probe"
    try:
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", ns, "link", "add", "a0", "type", "veth", "peer", "name", "a1")
        netem = _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "a0", "root",
                     "netem", "delay", "1ms", check=False).returncode == 0
        if netem:
            return None, True, None
        for cand in ("iptables", "iptables-nft", "iptables-legacy"):
            if _which(cand) and _run("ip", "netns", "exec", ns, cand, "-A", "FORWARD", "-j",
                                     "NFQUEUE", "--queue-num", "0", check=False).returncode == 0:
                return None, False, cand
        return "no netem qdisc and no iptables NFQUEUE for a delay line", False, None
    finally:
        _run("ip", "netns", "del", ns, check=False)


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


def micro_batch(hidden: int, step_kib: int, compression: str | None) -> int:
    """Samples per micro-batch so that one step moves about ``step_kib`` KiB each way."""
    per_value = {None: 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0625}.get(compression, 4.0)
    return max(64, int(step_kib * 1024 / (2 * hidden * per_value)) // 64 * 64)


def run(args: argparse.Namespace) -> int:
    p = dict(PRESETS[args.preset])
    p["seconds"] = args.seconds or p["seconds"]
    p["step_kib"] = args.step_kib or p["step_kib"]
    hidden, depth = args.hidden or p["hidden"], args.in_flight or p["in_flight"]
    reason, netem, iptables = why_not()
    if reason is not None:
        print(f"no netem: skipped ({reason})")
        return 0
    from volunteer.wire.tensors import COMPRESSIONS

    wanted = ["fp32", "fp16", "bf16", "int8"]
    if args.formats:
        wanted = [w for w in wanted if w in args.formats.split(",")]
    formats = [w for w in wanted if (None if w == "fp32" else w) in COMPRESSIONS]
    missing = [w for w in wanted if w not in formats]
    mbs = {f: micro_batch(hidden, p["step_kib"], None if f == "fp32" else f) for f in formats}
    results: dict = {"preset": args.preset, "hidden": hidden, "in_flight": depth,
                     "rate_mbit": RATE_BIT / 1e6, "one_way_ms": ONE_WAY_MS,
                     "seconds": p["seconds"], "skipped_formats": missing, "formats": {}}
    link = Link()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        link.build(netem, iptables)
        results["link"] = link.kind
        vol = link.spawn("vol", "volunteer", str(hidden), *map(str, mbs.values()))
        compute = {int(k): v for k, v in event(vol, "ready", 180)["compute"].items()}
        endpoint = f"tcp://{SUBNETS[0]}.1:{PORT}"
        print(f"preset {args.preset}: link {link.kind}, {RATE_BIT / 1e6:.0f} Mbit/s, "
              f"{2 * ONE_WAY_MS} ms RTT; ffn h={hidden}, {depth} micro-batches in flight"
              + (f"; not in COMPRESSIONS here: {', '.join(missing)}" if missing else ""))
        plan = ",".join(f"{f}:{mbs[f]}" for f in formats)
        tr = link.spawn("trn", "trainer", endpoint, str(hidden), plan, str(depth),
                        str(p["warmup"]), str(p["seconds"]))
        for fmt in formats:
            got = event(tr, "result", p["warmup"] + p["seconds"] + 180)
            assert got["format"] == fmt, got
            mb = mbs[fmt]
            assert vol.stdin is not None
            vol.stdin.write("stats\n")
            vol.stdin.flush()
            served = event(vol, "stats", 30)["latency_ms"]
            per_sample = max(got["up_bytes"], got["down_bytes"]) / mb
            bound = RATE_BIT / 8 / per_sample
            row = {"micro_batch": mb, "samples_per_s": got["samples_per_s"],
                   "bytes_per_sample_up": got["up_bytes"] / mb,
                   "bytes_per_sample_down": got["down_bytes"] / mb, "link_bound": bound,
                   "ratio": got["samples_per_s"] / bound, "compute_bound": compute[mb],
                   "rtt_ms": got["rtt_ms"], "volunteer_latency_ms": served,
                   "failed_steps": got["failed_steps"], "first_failure": got["first_failure"]}
            results["formats"][fmt] = row
            print(f"  {fmt:>4}: {row['samples_per_s']:9.0f} samples/s  link bound "
                  f"{bound:9.0f} ({per_sample:6.1f} B/sample each way)  ratio "
                  f"{row['ratio']:.3f}  volunteer compute {compute[mb]:9.0f}/s  "
                  f"rtt {got['rtt_ms']:.1f} ms  micro-batch {mb}  volunteer queue/compute "
                  f"p50 {served['queue_p50']:.0f}/{served['compute_p50']:.0f} ms"
                  + (f"  {got['failed_steps']} steps failed ({got['first_failure']})"
                     if got["failed_steps"] else ""))
    finally:
        link.close()
        signal.signal(signal.SIGTERM, previous)
    rows = results["formats"]
    base = rows.get("fp32", {}).get("samples_per_s") or 0.0
    for row in rows.values():
        row["gain_over_fp32"] = row["samples_per_s"] / base if base else None
        row["target_met"] = row["ratio"] >= TARGET
        row["compute_bound_binds"] = row["compute_bound"] < row["link_bound"]
    print("  gain over fp32: " + ", ".join(
        f"{f} {r['gain_over_fp32']:.2f}x" for f, r in rows.items() if f != "fp32" and base))
    print(f"  target ratio >= {TARGET}: " + ", ".join(
        f"{f} {'met' if r['target_met'] else 'not met'}"
        + (" (volunteer compute-bound here)" if r["compute_bound_binds"] else "")
        for f, r in rows.items()))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--role":  # a process of the harness
        role, params = sys.argv[2], sys.argv[3:]
        if role == "delay":
            delay_line(int(params[0]), ONE_WAY_MS / 1000)
        elif role == "volunteer":
            volunteer(int(params[0]), [int(v) for v in params[1:]])
        elif role == "trainer":
            endpoint, hidden, plan, depth, warm, secs = params
            steps = [(f, int(mb)) for f, mb in (item.split(":") for item in plan.split(","))]
            trainer(endpoint, int(hidden), steps, int(depth), float(warm), float(secs))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--json", dest="json_path", help="write the results to this file")
    ap.add_argument("--in-flight", type=int, help="micro-batches in flight (preset's default)")
    ap.add_argument("--hidden", type=int, help="expert width (preset's default)")
    ap.add_argument("--formats", help="comma-separated subset of fp32,fp16,bf16,int8")
    ap.add_argument("--seconds", type=float, help="measuring time per format (preset's)")
    ap.add_argument("--step-kib", type=int, help="KiB each way per micro-batch step (preset's)")
    return run(ap.parse_args())


if __name__ == "__main__":
    sys.exit(main())

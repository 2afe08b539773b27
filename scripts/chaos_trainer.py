"""A trainer for the chaos bench: trains through the swarm and times every call it makes.

Run as a process (in a lab namespace) by ``bench_chaos.py``::

    python scripts/chaos_trainer.py --bootstrap MULTIADDR [...] --listen-host IP \\
        --dims 4 --hidden 32 --timeout 2.0 [--libp2p] [--seed 0]

It joins the swarm as a client peer (``ClientNode`` + ``DhtDirectory``, the public client
API) and trains ``Linear -> ReLU -> RemoteMixtureOfExperts -> Linear`` on a fixed toy task
until a line ``stop`` arrives on stdin (or stdin closes). ``--libp2p`` makes it call the
experts over libp2p streams instead of ZeroMQ, so two trainers cover both transports.

Every expert RPC (``RemoteExpert.call_reply``: forward, backward, the cache-miss resend) and
every directory lookup is timed against its own deadline (the call's timeout, the client's
``lookup_timeout``): a call that returns later than deadline + ``--slack`` + the time this
process was kept off the CPU meanwhile (``StallMeter``) is reported as a hang. Prints JSON lines on stdout: ``ready``; one ``step`` per training step (monotonic
start/end, whether it trained, the loss, backward calls answered and failed, why it
failed); one ``late`` per late call; a final ``summary`` with counts by op and outcome.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

_print_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()


class StallMeter:
    """How long this process waited for a CPU (or the GIL) when it asked for one.

    A thread sleeps ``tick`` seconds in a loop and records by how much each sleep overran.
    On a machine busier than its cores, a call can return after its deadline only because
    the process was not scheduled; the overruns summed over a call's span measure exactly
    that, so it is not mistaken for a hang (a call waiting on a frozen peer leaves this
    process idle: no overrun)."""

    def __init__(self, tick: float = 0.02, keep_s: float = 120.0) -> None:
        self.tick = tick
        self._samples: deque[tuple[float, float]] = deque(maxlen=int(keep_s / tick))
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True, name="stall-meter").start()

    def _run(self) -> None:
        while True:
            t = time.monotonic()
            time.sleep(self.tick)
            end = time.monotonic()
            with self._lock:
                self._samples.append((end, max(0.0, end - t - self.tick)))

    def between(self, t0: float, t1: float) -> float:
        """Seconds of overrun observed by the samples that ended within [t0, t1 + tick]."""
        with self._lock:
            return sum(lag for end, lag in self._samples if t0 <= end <= t1 + self.tick)


class CallLog:
    """Wall time of every call against its deadline; thread-safe counters. A call is late
    when it returned after deadline + slack + the process's stall during the call."""

    def __init__(self, slack: float) -> None:
        self.slack = slack
        self.stalls = StallMeter()
        self.outcomes: Counter[str] = Counter()
        self.late = 0
        self.late_raw = 0  # past deadline + slack before discounting the stall
        self.worst_ratio = 0.0
        self._lock = threading.Lock()

    def record(self, op: str, uid: str, t0: float, deadline: float, outcome: str, peer: str = "") -> None:
        t1 = time.monotonic()
        wall = t1 - t0
        raw = wall > deadline + self.slack
        stall = self.stalls.between(t0, t1) if raw else 0.0
        late = raw and wall > deadline + self.slack + stall
        with self._lock:
            self.outcomes[f"{op}:{outcome}"] += 1
            self.worst_ratio = max(self.worst_ratio, wall / deadline if deadline > 0 else 0.0)
            self.late += late
            self.late_raw += raw
        if raw:
            emit("late", op=op, uid=uid, t0=round(t0, 3), wall_s=round(wall, 3), deadline_s=deadline,
                 stall_s=round(stall, 3), hang=late, outcome=outcome, peer=peer)


def timed_expert_factory(log: CallLog, timeout: float) -> Any:
    """An ``expert_factory`` for RemoteMixtureOfExperts whose experts time each RPC."""
    from volunteer.client.remote_expert import RemoteExpert
    from volunteer.wire.errors import RemoteError

    class TimedRemoteExpert(RemoteExpert):
        def call_reply(self, op: str, tensors: list, **fields: Any) -> Any:
            t0 = time.monotonic()
            outcome = "ok"
            try:
                return super().call_reply(op, tensors, **fields)
            except RemoteError as e:
                outcome = e.code
                raise
            except BaseException as e:
                outcome = f"untyped:{type(e).__name__}"
                raise
            finally:
                log.record(op, self.uid, t0, self.timeout, outcome, repr(self.transport))

    return lambda uid, transport: TimedRemoteExpert(uid, transport, timeout=timeout)


class TimedDirectory:
    """Wraps a DhtDirectory: each ``children``/``resolve`` is timed against the lookup timeout."""

    def __init__(self, inner: Any, log: CallLog, deadline: float) -> None:
        self.inner, self.log, self.deadline = inner, log, deadline

    def _timed(self, op: str, fn: Any, arg: Sequence[str]) -> Any:
        t0 = time.monotonic()
        outcome = "ok"
        try:
            return fn(arg)
        except BaseException as e:
            outcome = type(e).__name__
            raise
        finally:
            self.log.record(op, ",".join(arg)[:80], t0, self.deadline, outcome)

    def children(self, prefixes: Sequence[str]) -> Any:
        return self._timed("lookup", self.inner.children, prefixes)

    def resolve(self, uids: Sequence[str]) -> Any:
        return self._timed("resolve", self.inner.resolve, uids)

    def invalidate(self, uids: Sequence[str] | None = None) -> None:
        self.inner.invalidate(uids)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", action="append", required=True)
    ap.add_argument("--listen-host", default="127.0.0.1")
    ap.add_argument("--prefix", default="chaos.ffn")
    ap.add_argument("--experiment", default="chaos")
    ap.add_argument("--dims", type=int, nargs="+", default=[4])
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=2.0, help="forward/backward timeout per expert call")
    ap.add_argument("--lookup-timeout", type=float, default=4.0)
    ap.add_argument("--slack", type=float, default=1.5, help="seconds past a deadline still counted on time")
    ap.add_argument("--libp2p", action="store_true", help="call experts over libp2p instead of ZeroMQ")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch import nn

    from volunteer.client.moe import NotEnoughExpertsError, RemoteMixtureOfExperts
    from volunteer.client.node import ClientNode

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    log = CallLog(args.slack)
    client = ClientNode(args.experiment, args.bootstrap, listen_addrs=[f"/ip4/{args.listen_host}/tcp/0"],
                        lookup_timeout=args.lookup_timeout, connect_timeout=args.timeout,
                        upgrade_timeout=1.0).start()
    inner = client.directory(prefer_zmq=not args.libp2p)
    moe = RemoteMixtureOfExperts(args.hidden, args.dims, args.prefix, TimedDirectory(inner, log, args.lookup_timeout),
                                 k_best=2, k_min=1, forward_timeout=args.timeout, backward_timeout=args.timeout,
                                 timeout_after_k_min=0.5, avoid_for=5.0,
                                 expert_factory=timed_expert_factory(log, args.timeout))
    model = nn.Sequential(nn.Linear(16, args.hidden), nn.ReLU(), moe, nn.Linear(args.hidden, 4))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.randn(512, 16)
    y = (x[:, :2].sum(1) > 0).long() + 2 * (x[:, 2] > 0).long()

    stop = threading.Event()

    def watch_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    emit("ready", peer_id=client.peer_id, transport="libp2p" if args.libp2p else "zmq")
    why: Counter[str] = Counter()
    steps = trained = bwd_ok = bwd_failed = non_finite_loss = 0
    try:
        while not stop.is_set():
            t0 = time.monotonic()
            idx = torch.randint(0, len(x), (64,))
            rec: dict[str, Any] = {"t0": round(t0, 4), "ok": False}
            try:
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                report = moe.last_report
                rec["bwd_ok"] = len(report.backward_answered) if report else 0
                rec["bwd_failed"] = len(report.backward_failed) if report else 0
                rec["loss"] = loss.item()
                if math.isfinite(rec["loss"]):
                    opt.step()
                    rec["ok"] = True
                else:
                    non_finite_loss += 1
            except NotEnoughExpertsError as e:
                rec["why"] = "not_enough_experts: " + str(e)[:160]
            except Exception as e:  # a lookup timing out, the client node failing: counted, not fatal
                rec["why"] = f"{type(e).__name__}: {e}"[:200]
            rec["t1"] = round(time.monotonic(), 4)
            steps += 1
            trained += rec["ok"]
            bwd_ok += rec.get("bwd_ok", 0)
            bwd_failed += rec.get("bwd_failed", 0)
            if "why" in rec:
                why[rec["why"].split(":")[0]] += 1
                time.sleep(0.25)  # nothing answered: do not spin on the DHT
            emit("step", **rec)
    finally:
        emit("summary", steps=steps, trained=trained, backward_answered=bwd_ok, backward_failed=bwd_failed,
             non_finite_loss=non_finite_loss, failed_steps=dict(why), calls=dict(log.outcomes),
             late_calls=log.late, late_calls_raw=log.late_raw, worst_wall_over_deadline=round(log.worst_ratio, 3))
        moe.close()
        inner.close()
        client.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A NAT-lab volunteer: real experts in a ``Runtime`` served through ``NetworkService``.

    python -m tests.netlab.dmoe_volunteer --ip IP --home DIR [--bootstrap ADDR] \\
        [--uid lab.ffn.0.0 ...] [--public yes|auto]

With no ``--uid`` it is the swarm's bootstrap + relay node (``--public yes``: a new swarm,
relay HOP on). With uids it hosts those experts (kind ffn, hidden ``--hidden-dim``) and
announces them in the DHT with its relay addresses when it is behind a NAT. This is the
daemon's network path without the CLI: the same ``Runtime.submit`` behind the same
``NetworkService`` (which runs ``NatTraversal``).

Stdout: JSON lines ``ready`` (peer id, addrs, reachability, relay addrs, announce result,
seconds since the module started),
then answers to stdin commands ``{"cmd": "stats"}`` (per-uid ``updates_applied`` and
``requests``) and ``{"cmd": "snapshot"}`` (NetworkService.snapshot()); ``quit`` exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from tests.netlab.events import debug_logging, emit, run_program

STARTED = time.monotonic()


def main(args: argparse.Namespace) -> None:
    from volunteer.experts.backend import ExpertBackend, OptimizerSpec
    from volunteer.net.host import quiet_libp2p_logging
    from volunteer.net.service import NetworkService
    from volunteer.runtime.limits import ServingLimits
    from volunteer.runtime.runtime import Runtime

    quiet_libp2p_logging()
    debug_logging()
    runtime = None
    if args.uid:
        backends = {uid: ExpertBackend(uid, "ffn", args.hidden_dim, OptimizerSpec(lr=1e-3))
                    for uid in args.uid}
        runtime = Runtime(backends, ServingLimits())
        runtime.start()
    network = SimpleNamespace(bootstrap=args.bootstrap, relays=args.bootstrap,
                              listen_port=args.port, announce_addrs=[], public=args.public)
    svc = NetworkService(Path(args.home), args.experiment, network,
                         submit=runtime.submit if runtime else None, zmq_endpoint=None,
                         listen_host=args.ip, ttl=120.0)
    svc.start(timeout=90)
    report = None
    if args.uid:
        report = svc.announce(list(args.uid), "serving", 0.0)
    snap = svc.snapshot()
    emit("ready", peer_id=svc.peer_id, addrs=svc.multiaddrs, reachability=svc.reachability,
         relay_addrs=snap.get("relay_addrs", []), announced=bool(report and report.ok),
         seconds=round(time.monotonic() - STARTED, 3))
    try:
        for line in sys.stdin:
            try:
                cmd = json.loads(line).get("cmd")
            except Exception:
                emit("failed", cmd=None, error="bad json")
                continue
            if cmd == "quit":
                break
            if cmd == "stats":
                stats = runtime.stats() if runtime else {}
                emit("stats", experts={uid: {"updates_applied": s.get("updates_applied", 0),
                                             "requests": s.get("requests", 0)}
                                       for uid, s in stats.items()})
            elif cmd == "snapshot":
                emit("snapshot", **svc.snapshot())
            else:
                emit("failed", cmd=cmd, error="unknown command")
    finally:
        svc.stop()
        if runtime is not None:
            runtime.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ip", required=True)
    parser.add_argument("--port", type=int, default=4001)
    parser.add_argument("--home", required=True)
    parser.add_argument("--experiment", default="natlab")
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--uid", action="append", default=[])
    parser.add_argument("--hidden-dim", type=int, default=16)
    parser.add_argument("--public", default="auto", choices=["auto", "yes", "no"])
    run_program(lambda: main(parser.parse_args()))

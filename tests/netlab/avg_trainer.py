"""A NAT-lab trainer that averages: joins a run's group through the DHT and exchanges tensors.

    python -m tests.netlab.avg_trainer --ip IP --bootstrap ADDR --run lab-run --exchanges 5

The product's averaging path, nothing lab-specific: a ``ClientNode`` (``nat=True``: the
reachability check runs at start) joins ``averaging_group(run)``, which takes a relay
reservation when the node is private and announces its circuit address in its signed
member entry; members find each other under ``_avg.<run>.`` and exchange on
``/volunteer/averaging/1.0.0`` through ``ClientNode``'s connector (direct, else relayed,
then a DCUtR hole punch if one lands within ``--upgrade-timeout``). The handler answers the
received tensors + 1 (no averaging arithmetic: this proves the path, not a method).

Stdout JSON lines: ``joined`` (peer id, reachability, relay addrs, the addresses its entry
announces), ``members`` (the other members found), ``exchanged`` (per exchange: ok or the
typed error, and its seconds (the first one includes connecting); connection kinds per peer as ``dmoe_trainer`` reports them; channel counters),
or ``error``. Then stdin ``{"cmd": "served"}`` answers ``served`` (senders whose exchanges
this node's handler answered, and how often), ``{"cmd": "quit"}`` (or EOF) exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter

from tests.netlab.dmoe_trainer import connect_kinds, kinds_by_peer
from tests.netlab.events import debug_logging, emit, run_program

STARTED = time.monotonic()


def main(args: argparse.Namespace) -> None:
    import torch

    from volunteer.client.averaging.group import Exchange
    from volunteer.client.node import ClientNode
    from volunteer.net.host import quiet_libp2p_logging
    from volunteer.wire.errors import RemoteError

    quiet_libp2p_logging()
    debug_logging()
    client = ClientNode(args.experiment, args.bootstrap,
                        listen_addrs=(f"/ip4/{args.ip}/tcp/{args.port}",), nat=True,
                        upgrade_timeout=args.upgrade_timeout).start()
    served: Counter[str] = Counter()
    lock = threading.Lock()

    def plus_one(sender: str, request: Exchange) -> list[torch.Tensor]:
        with lock:
            served[sender] += 1
        return [t + 1 for t in request.tensors]

    group = client.averaging_group(args.run, cache_s=1.0)
    group.serve(plus_one)
    averaging = client.averaging
    assert averaging is not None
    relay_addrs = client.call(_async(lambda: list(client.nat.relay_addrs) if client.nat else []))
    emit("joined", peer_id=client.peer_id, reachability=client.reachability,
         nat_error=client.nat_error, relay_addrs=relay_addrs,
         announced=client.call(_async(averaging.addrs)),
         seconds=round(time.monotonic() - STARTED, 3))

    deadline = time.monotonic() + args.discover_timeout
    while len(group.members()) < args.expect and time.monotonic() < deadline:
        time.sleep(0.2)
    members = group.members()
    emit("members", members=members, seconds=round(time.monotonic() - STARTED, 3))

    results: list[str] = []
    took: list[float] = []
    for i in range(args.exchanges):
        for peer in members:
            x = torch.randn(args.size)
            t0 = time.monotonic()
            try:
                out = group.exchange(peer, Exchange("elastic", i, [x, torch.ones(3)]),
                                     args.timeout)
                good = len(out) == 2 and torch.allclose(out[0], x + 1) and \
                    torch.equal(out[1], torch.full((3,), 2.0))
                results.append("ok" if good else "wrong answer")
            except RemoteError as e:
                results.append(f"{type(e).__name__}: {e}"[:200])
            took.append(round(time.monotonic() - t0, 3))
    kinds = kinds_by_peer(client)
    emit("exchanged", results=results, took_s=took, connect_kinds=connect_kinds(kinds), kinds=kinds,
         channel=client._thread.run_sync(averaging.channel.snapshot),
         nat=client.call(_async(lambda: client.nat.snapshot() if client.nat else {})),
         seconds=round(time.monotonic() - STARTED, 3))
    for line in sys.stdin:  # stay up (and keep answering) until the test says quit
        try:
            cmd = json.loads(line).get("cmd")
        except Exception:
            continue
        if cmd == "quit":
            break
        if cmd == "served":
            with lock:
                emit("served", served=dict(served))
    group.close()
    client.stop()


def _async(fn):
    async def run():
        return fn()
    return run


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ip", required=True)
    parser.add_argument("--port", type=int, default=4001)
    parser.add_argument("--experiment", default="natlab")
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--run", default="lab-run")
    parser.add_argument("--expect", type=int, default=1, help="other members to wait for")
    parser.add_argument("--exchanges", type=int, default=5)
    parser.add_argument("--size", type=int, default=65536, help="elements of the big tensor")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="per-exchange timeout; the first one also connects")
    parser.add_argument("--discover-timeout", type=float, default=90.0)
    parser.add_argument("--upgrade-timeout", type=float, default=8.0)
    run_program(lambda: main(parser.parse_args()))

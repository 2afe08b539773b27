"""A NAT-lab trainer: trains a small DMoE model through volunteers found in the DHT.

    python -m tests.netlab.dmoe_trainer --ip IP --bootstrap ADDR --prefix lab.ffn \\
        --grid 2 2 --steps 30

Trainer side of the full NAT proof: a ``ClientNode`` (DHT client) joined through the
bootstrap/relay node, plus ``NatTraversal`` on the same host so that it can dial relayed
volunteers and answer/initiate DCUtR hole punches. ``DhtDirectory`` finds experts;
before a Libp2pTransport is first used, ``NatAwareDirectory`` connects to that server via
``NatTraversal.connect`` (direct address, else the relay circuit; DCUtR upgrades it).
Model: Linear -> ReLU -> RemoteMixtureOfExperts -> Linear on a fixed synthetic regression.

Stdout JSON lines: ``joined``, ``step`` (every few steps: loss, experts answered),
``done`` (first/last loss, per-volunteer connection kinds, counts), or ``error``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import traceback
from collections.abc import Sequence


def _debug_logging() -> None:
    """NATLAB_DEBUG=logger1,logger2 turns those loggers to DEBUG on stderr."""
    import logging
    import os

    names = [n for n in os.environ.get("NATLAB_DEBUG", "").split(",") if n]
    if names:
        logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    for name in names:
        logging.getLogger(name).setLevel(logging.DEBUG)


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}, default=str) + "\n")
    sys.stdout.flush()


class NatAwareDirectory:
    """ExpertDirectory: ``DhtDirectory`` + a NatTraversal connect before first use."""

    def __init__(self, inner, client, nat, upgrade_timeout: float) -> None:
        self.inner, self.client, self.nat = inner, client, nat
        self.upgrade_timeout = upgrade_timeout
        self._connected: set[str] = set()
        self._lock = threading.Lock()
        self.connect_kinds: dict[str, str] = {}

    def children(self, prefixes: Sequence[str]) -> dict[str, list[int]]:
        return self.inner.children(prefixes)

    def resolve(self, uids: Sequence[str]) -> dict:
        out = self.inner.resolve(uids)
        for transport in out.values():
            pid = getattr(transport, "peer_id", None)
            addrs = list(getattr(transport, "addrs", []) or [])
            if pid is None or not addrs:
                continue
            key = pid.to_base58()
            with self._lock:
                if key in self._connected:
                    continue
                self._connected.add(key)
            conn = self.client._thread.call(self.nat.connect, addrs, 20.0, 3.0, self.upgrade_timeout)
            self.connect_kinds[key] = self.nat.connection_kind(conn) if conn else "failed"
        return out

    def close(self) -> None:
        self.inner.close()


def kinds_by_peer(client, nat) -> dict[str, list[list]]:
    """peer id -> [[kind, open streams, remote ip:port], ...] for each open connection."""
    from volunteer.net.nat.connections import remote_ip_port

    async def collect() -> dict[str, list[list]]:
        out: dict[str, list[list]] = {}
        for pid, conns in list(client.node.host.get_network().connections.items()):
            for conn in conns if isinstance(conns, list) else [conns]:
                if not conn.is_closed:
                    remote = remote_ip_port(conn)
                    out.setdefault(pid.to_base58(), []).append(
                        [nat.connection_kind(conn), len(conn.get_streams()),
                         f"{remote[0]}:{remote[1]}" if remote else None])
        return out
    return client._thread.call(collect)


def main(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from volunteer.client.moe import NotEnoughExpertsError, RemoteMixtureOfExperts
    from volunteer.net.client_node import ClientNode
    from volunteer.net.host import quiet_libp2p_logging
    from volunteer.net.nat.traversal import NatTraversal

    quiet_libp2p_logging()
    _debug_logging()
    client = ClientNode(args.experiment, args.bootstrap,
                        listen_addrs=(f"/ip4/{args.ip}/tcp/{args.port}",)).start()
    nat = NatTraversal(client.node.host, relays=list(args.bootstrap), allow_hop=False)

    async def start_nat() -> None:
        assert client.rpc is not None
        await client.rpc.nursery.start(nat.run)

    client._thread.call(start_nat)
    directory = NatAwareDirectory(client.directory(), client, nat, args.upgrade_timeout)
    emit("joined", peer_id=client.peer_id, reachability=nat.reachability,
         relay_addrs=nat.relay_addrs)
    # Wait (bounded) until the DHT shows experts under every first coordinate.
    deadline = time.monotonic() + args.discover_timeout
    while True:
        found = directory.children([args.prefix + "."])[args.prefix + "."]
        if len(found) >= args.grid[0] or time.monotonic() > deadline:
            break
        directory.inner.invalidate()
        time.sleep(0.5)
    emit("discovered", first_dim=found)

    torch.manual_seed(args.seed)
    hidden = args.hidden_dim
    moe = RemoteMixtureOfExperts(hidden, args.grid, args.prefix, directory, k_best=args.k_best,
                                 k_min=1, forward_timeout=args.timeout,
                                 backward_timeout=args.timeout, timeout_after_k_min=2.0)
    model = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), moe, nn.Linear(hidden, 1))
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    y = (x @ torch.randn(8, 1, generator=torch.Generator().manual_seed(2))).tanh()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses: list[float] = []
    answered: set[str] = set()
    skipped = 0
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x), (args.batch_size,))
        try:
            loss = F.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
        except NotEnoughExpertsError as e:
            skipped += 1
            emit("step", step=step, skipped=str(e)[:300])
            if skipped > args.steps // 2:
                raise
            continue
        opt.step()
        losses.append(loss.item())
        report = moe.last_report
        if report is not None:
            answered.update(report.answered)
        if step % 5 == 0:
            emit("step", step=step, loss=round(losses[-1], 5), answered=sorted(answered))
    moe.close()
    window = max(1, min(5, len(losses) // 3))
    emit("done", steps=len(losses), skipped=skipped,
         first_loss=sum(losses[:window]) / window, last_loss=sum(losses[-window:]) / window,
         answered=sorted(answered), connect_kinds=directory.connect_kinds,
         kinds=kinds_by_peer(client, nat), nat=nat.snapshot())
    for line in sys.stdin:  # stay up for the test's last questions, until quit/EOF
        if line.strip() == '{"cmd": "quit"}':
            break
        if '"kinds"' in line:
            emit("kinds", kinds=kinds_by_peer(client, nat))
    directory.close()
    client.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ip", required=True)
    parser.add_argument("--port", type=int, default=4001)
    parser.add_argument("--experiment", default="natlab")
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--prefix", default="lab.ffn")
    parser.add_argument("--grid", type=int, nargs="+", default=[2, 2])
    parser.add_argument("--hidden-dim", type=int, default=16)
    parser.add_argument("--k-best", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--discover-timeout", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--upgrade-timeout", type=float, default=25.0,
                        help="wait this long for a hole punch before using a relayed peer")
    try:
        main(parser.parse_args())
    except KeyboardInterrupt:
        pass
    except Exception as e:
        emit("error", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-3000:])
        sys.exit(1)

"""A NAT-lab trainer: trains a small DMoE model through volunteers found in the DHT.

    python -m tests.netlab.dmoe_trainer --ip IP --bootstrap ADDR --prefix lab.ffn \\
        --grid 2 2 --steps 30

The product's trainer path, nothing lab-specific: a ``ClientNode`` (DHT client) joined
through the bootstrap/relay node, its ``DhtDirectory`` and ``RemoteMixtureOfExperts``.
``ClientNode`` reaches NATed volunteers by itself: the first RPC to a server dials its
direct addresses, else its relay circuit, then waits up to ``--upgrade-timeout`` s for a
DCUtR hole punch (so that connection time counts against ``--timeout``). ``nat=True``
runs the reachability check at start, so ``joined`` reports it (the lazy default would
still say ``unknown`` then). Model: Linear -> ReLU -> RemoteMixtureOfExperts -> Linear on a
fixed synthetic regression.

Stdout JSON lines: ``joined`` (peer id, reachability, seconds since start),
``discovered`` (first grid coordinates found, seconds since start), ``step`` (every few
steps: loss, experts answered), ``done`` (first/last loss, per-volunteer connection
kinds, NAT snapshot, RPC stats), or ``error``. Then stdin ``{"cmd": "kinds"}`` answers
``kinds``; ``{"cmd": "quit"}`` (or EOF) exits.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from tests.netlab.events import debug_logging, emit, run_program

STARTED = time.monotonic()
KIND_ORDER = ("hole_punched", "direct", "relayed")


def kinds_by_peer(client: Any) -> dict[str, list[list]]:
    """peer id -> [[kind, open streams, remote ip:port], ...] for each open connection."""
    from volunteer.net.nat.connections import remote_ip_port

    nat = client.nat

    async def collect() -> dict[str, list[list]]:
        out: dict[str, list[list]] = {}
        for pid, conns in list(client.node.host.get_network().connections.items()):
            for conn in conns if isinstance(conns, list) else [conns]:
                if not conn.is_closed:
                    remote = remote_ip_port(conn)
                    kind = nat.connection_kind(conn) if nat is not None else "direct"
                    out.setdefault(pid.to_base58(), []).append(
                        [kind, len(conn.get_streams()),
                         f"{remote[0]}:{remote[1]}" if remote else None])
        return out
    return client.call(collect)


def connect_kinds(kinds: dict[str, list[list]]) -> dict[str, str]:
    """peer id -> the kind of connection its RPC streams run on (the one with the most
    open streams; a hole-punched one with streams wins, since new calls move onto it)."""
    out: dict[str, str] = {}
    for pid, conns in kinds.items():
        used = [c for c in conns if c[1] > 0] or conns
        if any(c[0] == "hole_punched" for c in used):
            out[pid] = "hole_punched"
            continue
        best = max(used, key=lambda c: (c[1], -KIND_ORDER.index(c[0]) if c[0] in KIND_ORDER else -9))
        out[pid] = best[0]
    return out


def main(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from volunteer.client.moe import NotEnoughExpertsError, RemoteMixtureOfExperts
    from volunteer.client.node import ClientNode
    from volunteer.net.host import quiet_libp2p_logging

    quiet_libp2p_logging()
    debug_logging()
    client = ClientNode(args.experiment, args.bootstrap,
                        listen_addrs=(f"/ip4/{args.ip}/tcp/{args.port}",), nat=True,
                        upgrade_timeout=args.upgrade_timeout).start()
    directory = client.directory()
    emit("joined", peer_id=client.peer_id, reachability=client.reachability,
         nat_error=client.nat_error, seconds=round(time.monotonic() - STARTED, 3))
    # Wait (bounded) until the DHT shows experts under every first coordinate.
    deadline = time.monotonic() + args.discover_timeout
    while True:
        found = directory.children([args.prefix + "."])[args.prefix + "."]
        if len(found) >= args.grid[0] or time.monotonic() > deadline:
            break
        directory.invalidate()
        time.sleep(0.5)
    emit("discovered", first_dim=found, seconds=round(time.monotonic() - STARTED, 3))

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
    first_step_s = None
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
        if first_step_s is None:
            first_step_s = round(time.monotonic() - STARTED, 3)
        report = moe.last_report
        if report is not None:
            answered.update(report.answered)
        if step % 5 == 0:
            emit("step", step=step, loss=round(losses[-1], 5), answered=sorted(answered))
    moe.close()
    window = max(1, min(5, len(losses) // 3))
    kinds = kinds_by_peer(client)
    emit("done", steps=len(losses), skipped=skipped,
         first_loss=sum(losses[:window]) / window, last_loss=sum(losses[-window:]) / window,
         answered=sorted(answered), connect_kinds=connect_kinds(kinds), kinds=kinds,
         nat=client.nat.snapshot() if client.nat is not None else {},
         rpc=vars(client.rpc.stats) if client.rpc is not None else {},
         first_step_s=first_step_s, seconds=round(time.monotonic() - STARTED, 3))
    for line in sys.stdin:  # stay up for the test's last questions, until quit/EOF
        if line.strip() == '{"cmd": "quit"}':
            break
        if '"kinds"' in line:
            emit("kinds", kinds=kinds_by_peer(client))
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
    parser.add_argument("--timeout", type=float, default=20.0,
                        help="per-call RPC timeout; the first call to a server also connects")
    parser.add_argument("--discover-timeout", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--upgrade-timeout", type=float, default=8.0,
                        help="wait this long for a hole punch before using a relayed peer "
                             "(part of the first call's --timeout: keep it <= ~10 s)")
    run_program(lambda: main(parser.parse_args()))

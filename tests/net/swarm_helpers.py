"""Helpers for net tests: start real libp2p nodes on loopback inside one trio run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from volunteer.net.host import load_or_create_identity
from volunteer.net.node import NodeConfig, SwarmNode

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


async def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05) -> None:
    """Poll ``predicate()`` (sync or async) until true; fail after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while True:
            res = predicate()
            if hasattr(res, "__await__"):
                res = await res
            if res:
                return
            await trio.sleep(interval)


async def _run_killable(node: SwarmNode, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    with trio.CancelScope() as scope:
        node.kill = scope.cancel  # type: ignore[attr-defined]  (tests stop one node with it)
        await node.run(task_status=task_status)


@asynccontextmanager
async def swarm(tmp: Path, n: int, *, clients: int = 0, **cfg) -> AsyncIterator[list[SwarmNode]]:
    """``n`` DHT-server nodes bootstrapped (one after another) to node 0, then ``clients``
    DHT-client nodes; all torn down on exit."""
    async with trio.open_nursery() as nursery:
        nodes: list[SwarmNode] = []
        first = SwarmNode(load_or_create_identity(tmp / "n0"), NodeConfig(listen_addrs=LOOPBACK, **cfg))
        await nursery.start(_run_killable, first)
        nodes.append(first)
        boot = first.multiaddrs()
        for i in range(1, n + clients):
            node = SwarmNode(
                load_or_create_identity(tmp / f"n{i}"),
                NodeConfig(listen_addrs=LOOPBACK, bootstrap=boot, dht_server=i < n, **cfg),
            )
            await nursery.start(_run_killable, node)
            nodes.append(node)
        try:
            yield nodes
        finally:
            nursery.cancel_scope.cancel()

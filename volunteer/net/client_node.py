"""Trainer-side peer: joins the swarm as a DHT client, serves no experts, sync API.

``ClientNode(experiment, bootstrap=[...])`` runs a ``SwarmNode`` (DHT client mode: it queries
the DHT but stores no records and is not asked to) and an ``RpcClient`` in a background
trio thread. Trainers use it through ``DhtDirectory`` (``directory()``), or directly:
``children(prefixes)``, ``servers(uid)``, ``transport(peer_id, addrs)``.

The identity is ephemeral unless ``home`` is given (then ``home/identity.key`` is reused).
With ``relays`` (or ``nat=True``) it also runs ``volunteer.net.nat.traversal.NatTraversal``
(relay client + DCUtR) and reaches servers through it: directly when it can, else over a
relay circuit that hole punching later upgrades.
Use as a context manager, or call ``start()`` / ``stop()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from volunteer.net.host import default_listen_host, load_or_create_identity
from volunteer.net.node import NodeConfig, SwarmNode
from volunteer.net.records import ServerEntry
from volunteer.net.registry import ExpertRegistry
from volunteer.net.rpc_client import REPLY_LIMITS, Libp2pTransport, RpcClient
from volunteer.net.trio_thread import TrioThread
from volunteer.wire.limits import WireLimits

if TYPE_CHECKING:
    from volunteer.net.dht_directory import DhtDirectory



class ClientNode:
    """A trainer's libp2p peer (see module docstring)."""

    def __init__(self, experiment: str, bootstrap: Sequence[str], *, home: Path | None = None,
                 listen_addrs: Sequence[str] | None = None,
                 limits: WireLimits = REPLY_LIMITS, lookup_timeout: float = 15.0,
                 relays: Sequence[str] = (), nat: bool | None = None, max_streams: int = 2,
                 **node_options: Any) -> None:
        key_pair = load_or_create_identity(home) if home is not None else create_new_key_pair()
        self.experiment = experiment
        self.lookup_timeout = lookup_timeout
        if listen_addrs is None:
            listen_addrs = (f"/ip4/{default_listen_host()}/tcp/0",)
        self.node = SwarmNode(key_pair, NodeConfig(listen_addrs=tuple(listen_addrs),
                                                   bootstrap=tuple(bootstrap), dht_server=False,
                                                   **node_options))
        self.registry = ExpertRegistry(self.node.dht, key_pair, experiment)
        self._limits = limits
        self._thread = TrioThread(name=f"volunteer-client-{self.node.peer_id.to_base58()[-6:]}")
        self.rpc: RpcClient | None = None
        self.max_streams = max_streams
        self.relays = list(relays)
        self.use_nat = bool(relays) if nat is None else nat
        self.nat: Any = None
        self.nursery: trio.Nursery | None = None

    @property
    def peer_id(self) -> str:
        return self.node.peer_id.to_base58()

    @property
    def multiaddrs(self) -> list[str]:
        return self.node.multiaddrs()

    def start(self, timeout: float = 60.0) -> ClientNode:
        self._thread.start(self._main, timeout=timeout)
        return self

    async def _main(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await nursery.start(self.node.run)
            connector = None
            if self.use_nat:
                from volunteer.net.nat.traversal import NatTraversal

                self.nat = NatTraversal(self.node.host, self.relays or list(self.node.config.bootstrap),
                                        allow_hop=False, bootstrap=list(self.node.config.bootstrap))
                await nursery.start(self.nat.run)
                connector = self._nat_connect
            self.rpc = RpcClient(self.node.host, nursery, self._limits,
                                 max_streams=self.max_streams, connector=connector)
            task_status.started(self)

    async def _nat_connect(self, peer_id: Any, addrs: list[str]) -> None:
        """Reach a server by its announced addresses: direct, else through its relay
        (DCUtR then upgrades the relayed connection to a direct one by itself)."""
        full = [a if "/p2p/" in a else f"{a}/p2p/{peer_id.to_base58()}" for a in addrs]
        if await self.nat.connect(full) is None:
            raise ConnectionError(f"no direct or relayed route to {peer_id}")

    def call(self, async_fn: Any, *args: Any) -> Any:
        """Run ``async_fn(*args)`` in the node's trio loop and return its result."""
        return self._thread.call(async_fn, *args)

    def stop(self) -> None:
        self._thread.stop()

    def __enter__(self) -> ClientNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def connected_peers(self) -> list[str]:
        return self._thread.call(_sync_async(self.node.connected_peers))

    def _lookup(self, async_fn: Any, *args: Any) -> Any:
        async def bounded() -> Any:
            with trio.fail_after(self.lookup_timeout):
                return await async_fn(*args)
        return self._thread.call(bounded)

    def children(self, prefixes: Sequence[str]) -> dict[str, list[int]]:
        """Uncached DHT lookup (``DhtDirectory`` caches)."""
        return self._lookup(self.registry.children, list(prefixes))

    def lookup(self, prefixes: Sequence[str]) -> dict[str, list[ServerEntry]]:
        """Live entries for several prefix queries, looked up concurrently."""
        async def many(ps: list[str]) -> dict[str, list[ServerEntry]]:
            out: dict[str, list[ServerEntry]] = {}

            async def one(p: str) -> None:
                out[p] = await self.registry.lookup(p)

            async with trio.open_nursery() as n:
                for p in dict.fromkeys(ps):
                    n.start_soon(one, p)
            return out
        return self._lookup(many, list(prefixes))

    def servers(self, uid: str) -> list[ServerEntry]:
        return self._lookup(self.registry.servers, uid)

    def transport(self, peer_id: str, addrs: Sequence[str] = ()) -> Libp2pTransport:
        if self.rpc is None:
            raise RuntimeError("ClientNode is not started")
        return Libp2pTransport(self._thread, self.rpc, peer_id, addrs)

    def directory(self, **options: Any) -> DhtDirectory:
        from volunteer.net.dht_directory import DhtDirectory

        return DhtDirectory(self, **options)


def _sync_async(fn: Any) -> Any:
    async def run() -> Any:
        return fn()
    return run

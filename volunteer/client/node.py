"""Trainer-side peer: joins the swarm as a DHT client, serves no experts, sync API.

``ClientNode(experiment, bootstrap=[...])`` runs a ``SwarmNode`` (DHT client mode: it queries
the DHT but stores no records and is not asked to) and an ``RpcClient`` in a background
trio thread. Trainers use it through ``DhtDirectory`` (``directory()``), or directly:
``children(prefixes)``, ``servers(uid)``, ``transport(peer_id, addrs)``.

The identity is ephemeral unless ``home`` is given (then ``home/identity.key`` is reused).

NAT traversal is on by default: the node runs ``volunteer.net.nat.traversal.NatTraversal``
(relay client + DCUtR; no HOP and no reservations: a trainer only dials out) and opens a
new connection to a server through ``NatTraversal.connect``: direct addresses first, else
the relay circuit from the server's record (py-libp2p's own dialer skips ``/p2p-circuit``
addresses), then it waits up to ``upgrade_timeout`` s for a DCUtR hole punch so the expert
RPC streams run on the direct connection. When the punch fails the relayed connection is
used; if one lands later, ``RpcClient`` moves new calls onto it. So
``ClientNode(...).directory()`` alone reaches NATed volunteers.

``nat=None`` (default) starts NatTraversal lazily, the first time a server is announced
with a circuit address: a trainer that only talks to public servers never pays for the
reachability check (~4 s behind a NAT, where the dial-back never comes), and the check
does not collide with one the caller runs on the same host. ``nat=True`` runs it at
``start()`` (which then waits for the check), ``nat=False`` never (circuits unreachable).
Dial-back servers are ``relays`` if given, else the bootstrap peers. ``holepunch=False``
keeps relayed connections relayed (no DCUtR).
Use as a context manager, or call ``start()`` / ``stop()``.

Averaging: ``averaging_group(run_id, admit=..., admission_token=...)`` joins the run's
``SwarmGroup`` (members found through the DHT under ``_avg.<run_id>.``, exchanges on
``/volunteer/averaging/1.0.0``); the node then also takes relay reservations when it is not
public, so NATed trainers reach each other (``node_channel.py``). ``stop()`` leaves the groups.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from volunteer.net.dialing import dial
from volunteer.net.host import default_listen_host, load_or_create_identity
from volunteer.net.node import NodeConfig, SwarmNode
from volunteer.net.records import ServerEntry
from volunteer.net.registry import ExpertRegistry
from volunteer.net.rpc_client import REPLY_LIMITS, Libp2pTransport, RpcClient
from volunteer.net.trio_thread import TrioThread
from volunteer.wire.errors import RemoteTimeoutError
from volunteer.wire.limits import WireLimits

if TYPE_CHECKING:
    from volunteer.client.averaging.swarm_group import SwarmGroup
    from volunteer.client.dht_directory import DhtDirectory
    from volunteer.client.node_channel import NodeAveraging
    from volunteer.net.records import Admit

log = logging.getLogger(__name__)


class ClientNode:
    """A trainer's libp2p peer: finds experts in the DHT and reaches their volunteers, even
    behind NATs, without hosting anything (see module docstring). Start it, then hand
    ``node.directory()`` to ``RemoteMixtureOfExperts``; stop it when training ends (or use
    ``with ClientNode(...) as node:``).

    Args:
        experiment: the manifest's ``experiment.name``; records of other experiments are
            invisible. Must match the volunteers' manifest exactly.
        bootstrap: multiaddrs (``/ip4/.../tcp/.../p2p/<id>``) of long-lived swarm nodes, as
            in the manifest's ``network.bootstrap``; the node keeps redialling them. Pass
            the manifest's list; add a volunteer's printed address for a private swarm.
        home: folder holding a persistent identity (``home/identity.key``). None (default):
            a fresh peer id each run; set it when volunteers admit peers by id (a closed
            experiment) or you want stable ids in logs.
        listen_addrs: where this peer listens (default: one TCP port on the default host).
            A trainer only dials out; change it to pin a port for a firewall rule or for
            averaging peers that must dial this trainer directly.
        limits: bounds on replies read from volunteers (``WireLimits``; default
            ``REPLY_LIMITS``: 512 MiB, 64 tensors). Raise ``max_bytes`` only for experts whose
            outputs are larger; every reply is checked against them before allocation.
        lookup_timeout: seconds a DHT lookup may take before ``RemoteTimeoutError`` (default
            15). Lower it to fail a training step sooner when the DHT is unhealthy.
        relays: relay / dial-back servers for NAT traversal; default the bootstrap peers.
            Set it when your bootstrap nodes do not relay (the manifest's ``network.relays``).
        nat: None (default): start NAT traversal the first time a volunteer is announced
            behind a relay; True: at ``start()`` (waits for the reachability check); False:
            never (NATed volunteers are then unreachable: only for all-public swarms).
        max_streams: libp2p streams kept open per volunteer (default 2). Raise it when many
            threads call experts of the same volunteer at once and its calls queue.
        upgrade_timeout: seconds to wait for a hole punch before using a relayed connection
            (default 5). Lower it when punches rarely succeed on your network.
        connect_timeout: seconds to reach a volunteer (direct, then relayed) before the call
            fails as unreachable (default 20).
        holepunch: False keeps relayed connections relayed (no DCUtR); leave it on unless a
            network breaks hole punching.
        **node_options: further ``volunteer.net.node.NodeConfig`` fields (bootstrap backoff,
            ``announce_addrs``, ...); rarely needed.
    """

    def __init__(self, experiment: str, bootstrap: Sequence[str], *, home: Path | None = None,
                 listen_addrs: Sequence[str] | None = None,
                 limits: WireLimits = REPLY_LIMITS, lookup_timeout: float = 15.0,
                 relays: Sequence[str] = (), nat: bool | None = None, max_streams: int = 2,
                 upgrade_timeout: float = 5.0, connect_timeout: float = 20.0,
                 holepunch: bool = True, **node_options: Any) -> None:
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
        self.use_nat = nat is not False
        self.eager_nat = nat is True
        self.holepunch = holepunch
        self.upgrade_timeout = upgrade_timeout
        self.connect_timeout = connect_timeout
        self.nat: Any = None
        self.nat_error: str | None = None
        self._nat_ready: trio.Event | None = None
        self.nursery: trio.Nursery | None = None
        self.averaging: NodeAveraging | None = None
        self._averaging_lock = threading.Lock()

    @property
    def peer_id(self) -> str:
        """This peer's id (base58); volunteers and admission lists know it by this."""
        return self.node.peer_id.to_base58()

    @property
    def multiaddrs(self) -> list[str]:
        """This node's addresses (read in the network thread, which owns the host)."""
        return self._thread.run_sync(self.node.multiaddrs)

    def start(self, timeout: float = 60.0) -> ClientNode:
        """Start the network thread and wait (up to ``timeout`` s) until the host listens
        (and, with ``nat=True``, until the reachability check ends). Returns ``self``."""
        self._thread.start(self._main, timeout=timeout)
        return self

    @property
    def reachability(self) -> str:
        """``public`` / ``private`` / ``unknown`` (unknown until the background check ends)."""
        return self._thread.run_sync(
            lambda: str(self.nat.reachability) if self.nat is not None else "unknown")

    async def _main(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await nursery.start(self.node.run)
            self.rpc = RpcClient(self.node.host, nursery, self._limits,
                                 max_streams=self.max_streams,
                                 connector=self._nat_connect if self.use_nat else None,
                                 connect_timeout=self.connect_timeout)
            if self.eager_nat:
                await self._ensure_nat()
            task_status.started(self)

    async def _ensure_nat(self) -> None:
        """Start NatTraversal once (in the node's nursery) and wait until it is ready."""
        if self._nat_ready is None:
            from volunteer.net.nat.traversal import NatTraversal

            assert self.nursery is not None
            boot = list(self.node.config.bootstrap)
            self.nat = NatTraversal(self.node.host, self.relays or boot, allow_hop=False,
                                    bootstrap=boot, max_reservations=0,
                                    enable_holepunch=self.holepunch)
            self._nat_ready = trio.Event()
            self.nursery.start_soon(self._run_nat, self._nat_ready)
        await self._nat_ready.wait()

    async def _run_nat(self, ready: trio.Event) -> None:
        """Run NatTraversal; a failure leaves the node working with direct dials only."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.nat.run)
                ready.set()
        except Exception as e:
            self.nat_error = f"{type(e).__name__}: {e}"[:300]
            log.warning("NAT traversal stopped: %s", self.nat_error)
        finally:
            ready.set()

    async def _nat_connect(self, peer_id: Any, addrs: list[str]) -> None:
        """Reach a server by its announced addresses: direct, else through its relay,
        then give DCUtR ``upgrade_timeout`` s to turn a relayed connection direct."""
        if any("/p2p-circuit" in a for a in addrs):
            await self._ensure_nat()  # starts it once; later callers wait for readiness
        nat_up = self._nat_ready is not None and self._nat_ready.is_set() and self.nat_error is None
        await dial(self.node.host, self.nat if nat_up else None, peer_id, addrs,
                   timeout=self.connect_timeout, upgrade_timeout=self.upgrade_timeout)

    def call(self, async_fn: Any, *args: Any) -> Any:
        """Run ``async_fn(*args)`` in the node's trio loop and return its result."""
        return self._thread.call(async_fn, *args)

    def stop(self) -> None:
        """Leave averaging groups, close connections and stop the network thread."""
        if self.averaging is not None:
            self.averaging.close()  # withdraws the group entries while the loop still runs
        self._thread.stop()

    def __enter__(self) -> ClientNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def connected_peers(self) -> list[str]:
        """Peer ids this node holds connections to (a health check: empty means cut off)."""
        return self._thread.call(_sync_async(self.node.connected_peers))

    def _lookup(self, async_fn: Any, *args: Any) -> Any:
        """Run a DHT lookup in the network thread; past ``lookup_timeout`` it raises the typed
        ``RemoteTimeoutError`` (trio's own TooSlowError must not escape into a training loop)."""
        async def bounded() -> Any:
            with trio.fail_after(self.lookup_timeout):
                return await async_fn(*args)
        try:
            return self._thread.call(bounded)
        except trio.TooSlowError:
            raise RemoteTimeoutError(f"DHT lookup took longer than {self.lookup_timeout:g} s") from None

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
        """Live server entries of expert ``uid`` (uncached DHT lookup)."""
        return self._lookup(self.registry.servers, uid)

    def transport(self, peer_id: str, addrs: Sequence[str] = ()) -> Libp2pTransport:
        """A ``Transport`` that calls experts on ``peer_id`` over libp2p streams (dialling
        ``addrs``, relays included); for ``RemoteExpert`` when you pick servers yourself."""
        if self.rpc is None:
            raise RuntimeError("ClientNode is not started")
        return Libp2pTransport(self._thread, self.rpc, peer_id, addrs)

    def averaging_group(self, run_id: str, *, admit: Admit | None = None,
                        admission_token: bytes | None = None, reachable: bool = True,
                        ttl: float = 30.0, compression: str | None = None,
                        cache_s: float = 2.0, members_only: bool = True) -> SwarmGroup:
        """Join run ``run_id``'s averaging group (see ``node_channel.py``). ``admit``: the
        experiment's filter (``AdmissionPolicy.admits_entry``); ``admission_token``: this
        node's token in a closed experiment; ``reachable``: take relay reservations when
        not public; ``compression``: ``None``, ``"fp16"`` or ``"bf16"`` (half the bytes of
        float32 tensors; int8 is refused for parameters)."""
        from volunteer.client.node_channel import NodeAveraging

        if self.rpc is None:
            raise RuntimeError("ClientNode is not started")
        with self._averaging_lock:
            if self.averaging is None:
                self.averaging = NodeAveraging(self)
        if reachable:
            self.averaging.make_reachable()
        return self.averaging.group(run_id, admit=admit, admission_token=admission_token,
                                    ttl=ttl, compression=compression, cache_s=cache_s,
                                    members_only=members_only)

    def directory(self, **options: Any) -> DhtDirectory:
        """The ``ExpertDirectory`` over this node's DHT view, for ``RemoteMixtureOfExperts``;
        ``options`` go to ``DhtDirectory`` (e.g. ``cache_ttl``)."""
        from volunteer.client.dht_directory import DhtDirectory

        return DhtDirectory(self, **options)


def _sync_async(fn: Any) -> Any:
    async def run() -> Any:
        return fn()
    return run

"""NetworkService: the volunteer daemon's peer-network facade (trio + libp2p in a thread).

    svc = NetworkService(home, "demo", manifest.network, submit=runtime.submit,
                         zmq_endpoint="tcp://203.0.113.5:5555")
    svc.start()                         # listening, bootstrapped (or a new swarm), NAT ready
    svc.announce(uids, "serving", load) # published before it returns; heartbeats follow
    svc.set_draining()                  # re-announced as draining before it returns
    svc.shards.holders(uids)            # who holds which shard (``shard_network.py``)
    svc.stop()                          # withdraws the records (best effort), stops

Inside the thread: ``SwarmNode`` (host with the persistent identity from
``<home>/identity/``, KadDHT in server or client mode (below), self-healing bootstrap),
``RpcServer`` (expert RPC over streams into ``submit``), ``NatTraversal`` from
``volunteer.net.nat`` (reachability by dial-back, relay reservations, hole punching), and
a heartbeat that re-announces every ``ttl / 3`` seconds. Records carry the direct ZeroMQ
endpoint and the reachability, so trainers use ZeroMQ for publicly reachable nodes and
libp2p (direct, hole-punched or relayed) for the others.

DHT mode follows reachability (as go-libp2p's "auto" mode does): a node serves the DHT
only when others can dial it. A NATed volunteer that served the DHT was added to every
routing table with LAN addresses nobody can dial, and each lookup or announce that reached
it waited out a 3 s query timeout (NAT lab, 2 NATed volunteers: the second one's bootstrap
took 3.5 s and each announce 3.0 s; a trainer found the experts 12 s after starting; with
the rule: announce 0.02 s, discovery after 2-4 s). So with ``public: auto`` and bootstrap
peers the node starts as a DHT *client* and becomes a server once the dial-back check
says ``public`` or ``unknown`` (nobody answered: the old behaviour), staying a client when
``private``; every ``dht_mode_interval`` s the rule is re-applied if reachability changed.
``public: yes`` and a new swarm (no bootstrap) serve at once, ``public: no`` never.
A private node with relay reservations announces only its circuit addresses (its LAN
addresses would cost every trainer a direct-dial timeout before the relay is tried).

A manifest without bootstrap peers starts a new swarm; ``multiaddrs`` are the addresses
other volunteers put in their manifest's ``network.bootstrap``.

py-libp2p 0.8.1 only logs a listen that fails (port taken, address not local) and runs on
with no address; ``start()`` checks that the host listens and raises ``ListenError`` (an
``OSError`` naming the address and, when a probe bind can tell, the reason) instead of
returning a node nobody can dial.

A node with nobody to ask (a new swarm without relays: the first volunteer) cannot learn
its reachability; "unknown" is expected there, so it gets no advice and no start-up
warning (``_SwarmNat``). Nodes with bootstrap peers or relays keep the advice.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from volunteer.net.dialing import dial
from volunteer.net.host import default_listen_host, load_or_create_identity, peer_id_of
from volunteer.net.nat import reachability as rb
from volunteer.net.nat.traversal import NatTraversal
from volunteer.net.node import NodeConfig, SwarmNode
from volunteer.net.registry import DEFAULT_TTL, AnnounceReport, ExpertRegistry
from volunteer.net.rpc_server import RpcServer
from volunteer.net.shard_network import ShardNetwork
from volunteer.net.shard_rpc import ShardServer
from volunteer.net.trio_thread import TrioThread
from volunteer.wire.limits import DEFAULT_LIMITS, WireLimits

log = logging.getLogger(__name__)

ANNOUNCE_TIMEOUT = 20.0


class ListenError(OSError):
    """The libp2p host could not listen on its address (``str(err)`` is one line).

    ``address`` is "host:port", ``reason`` the probe's answer (e.g. "Address already in use").
    """

    def __init__(self, code: int, address: str, reason: str) -> None:
        super().__init__(code, f"the peer network cannot listen on {address}: {reason}")
        self.address = address
        self.reason = reason


class NetworkService:
    """Sync facade over the node's trio thread (see module docstring)."""

    def __init__(self, home: Path, experiment: str, network: Any = None,
                 submit: Callable[[list, Callable[[list], None]], None] | None = None,
                 zmq_endpoint: str | None = None, *, listen_host: str | None = None,
                 ttl: float = DEFAULT_TTL, heartbeat_interval: float | None = None,
                 limits: WireLimits = DEFAULT_LIMITS, enable_nat: bool = True,
                 dht_mode_interval: float = 5.0, shard_server: ShardServer | None = None) -> None:
        self.home = Path(home)
        self.experiment = experiment
        self.network = network
        self.submit = submit
        self.zmq_endpoint = zmq_endpoint
        self.ttl = ttl
        self.heartbeat_interval = heartbeat_interval or ttl / 3
        self.limits = limits
        self.enable_nat = enable_nat
        self.dht_mode_interval = dht_mode_interval
        host = listen_host or default_listen_host()
        port = int(getattr(network, "listen_port", 0) or 0)
        self.listen_host, self.listen_port = host, port
        self.bootstrap = tuple(getattr(network, "bootstrap", ()) or ())
        self.relays = list(getattr(network, "relays", ()) or ())
        self.public = str(getattr(network, "public", "auto") or "auto")
        self.key_pair = load_or_create_identity(self.home / "identity")
        self._peer_id = peer_id_of(self.key_pair).to_base58()
        self.node_config = NodeConfig(
            listen_addrs=(f"/ip4/{host}/tcp/{port}",),
            announce_addrs=tuple(getattr(network, "announce_addrs", ()) or ()),
            bootstrap=self.bootstrap,
            dht_server=self._initial_dht_server(),
        )
        self.node: SwarmNode | None = None
        self.registry: ExpertRegistry | None = None
        self.rpc: RpcServer | None = None
        self.nat: Any = None
        self.shard_server = shard_server
        self.shards: ShardNetwork | None = None
        self._thread = TrioThread(name="volunteer-net")
        self._uids: list[str] = []
        self._shards: dict[str, tuple[int, bytes]] = {}
        self._free = 0
        self._state = "serving"
        self._load = 0.0
        self._announce_lock: trio.Lock | None = None
        self.last_announce: AnnounceReport | None = None
        self.heartbeats = 0
        self._listen_error: ListenError | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 90.0) -> NetworkService:
        """Start the node; returns once it listens and the first bootstrap round is done.

        Raises ``ListenError`` when the host cannot listen (e.g. the port is taken).
        """
        try:
            self._thread.start(self._main, timeout=timeout)
        except BaseException:
            if self._listen_error is not None:  # unwrapped from trio's exception groups
                raise self._listen_error from None
            raise
        return self

    async def _main(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        self.node = SwarmNode(self.key_pair, self.node_config)
        self.registry = ExpertRegistry(self.node.dht, self.key_pair, self.experiment, ttl=self.ttl)
        self._announce_lock = trio.Lock()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.node.run)
            if not self.node.host.get_addrs():
                self._listen_error = _listen_error(self.listen_host, self.listen_port)
                raise self._listen_error
            if self.submit is not None:
                self.rpc = RpcServer(self.node.host, self.submit, self.limits)
                self.rpc.install()
            if self.enable_nat:
                self.nat = _make_nat(self.node, self.relays, self.bootstrap, self.public)
                await nursery.start(self.nat.run)
            self.shards = ShardNetwork(self._thread, self.node.host, nursery, self.registry, self._connect,
                                       self.shard_server)
            await self._apply_dht_mode()
            nursery.start_soon(self._dht_mode_watch)
            nursery.start_soon(self._heartbeat)
            task_status.started(self)

    def _initial_dht_server(self) -> bool:
        if self.public in ("yes", "no"):
            return self.public == "yes"
        # auto: a new swarm (nobody to ask) or no NAT check serves at once; otherwise
        # start as a client and decide when the reachability check is done.
        return not self.bootstrap or not self.enable_nat

    def wants_dht_server(self) -> bool:
        """The mode rule (see module docstring): serve the DHT unless known private."""
        if self.public in ("yes", "no"):
            return self.public == "yes"
        return self.reachability != "private"

    @property
    def dht_server(self) -> bool:
        """True while this node serves the DHT (answers queries, stores records)."""
        return self.node is not None and self.node.dht_server

    async def _apply_dht_mode(self) -> None:
        assert self.node is not None
        want = self.wants_dht_server()
        if await self.node.set_dht_server(want):
            log.info("DHT %s mode (reachability %s)", "server" if want else "client",
                     self.reachability)

    async def _dht_mode_watch(self) -> None:
        while True:
            await trio.sleep(self.dht_mode_interval)
            if self.wants_dht_server() != self.dht_server:
                try:
                    await self._apply_dht_mode()
                except Exception as e:  # keep serving in the current mode; retry later
                    log.warning("DHT mode switch failed: %r", e)

    def stop(self, withdraw_timeout: float = 3.0) -> None:
        """Withdraw this node's records (best effort, bounded) and stop the thread."""
        if self._thread.running and self._uids:
            try:
                self._thread.call(self._withdraw, withdraw_timeout)
            except Exception as e:
                log.debug("withdraw on stop failed: %r", e)
        self._thread.stop()

    # ------------------------------------------------------------------ announce
    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def multiaddrs(self) -> list[str]:
        return self.node.multiaddrs() if self.node is not None else []

    @property
    def reachability(self) -> str:
        if self.public == "yes":
            return "public"
        if self.public == "no":
            return "private"
        return getattr(self.nat, "reachability", "unknown") if self.nat is not None else "unknown"

    def announce(self, uids: Sequence[str], state: str = "serving", load: float = 0.0,
                 shards: Mapping[str, tuple[int, bytes]] | None = None, free: int | None = None) -> AnnounceReport:
        """Publish the hosted uids now (returns when stored) and keep them alive.

        ``shards``: uid -> (version, root) of the shard this node hands out for it (kept
        when None); ``free``: how many more experts it would take (kept when None).
        """
        self._uids = list(uids)
        self._state = state
        self._load = float(load)
        if shards is not None:
            self._shards = dict(shards)
        if free is not None:
            self._free = int(free)
        return self._thread.call(self._announce_now)

    async def _connect(self, peer_id: Any, addrs: list[str]) -> None:
        """Connector for shard traffic: direct, else relayed and then hole-punched."""
        await dial(self.node.host if self.node is not None else None, self.nat, peer_id, addrs,
                   timeout=20.0, upgrade_timeout=5.0)

    def set_load(self, load: float) -> None:
        """Update the load carried by the next heartbeat (no network round trip)."""
        self._load = float(load)

    def set_draining(self) -> AnnounceReport | None:
        """Mark every hosted expert draining and re-announce at once."""
        self._state = "draining"
        if not self._uids or not self._thread.running:
            return None
        return self._thread.call(self._announce_now)

    async def _announce_now(self) -> AnnounceReport:
        assert self.registry is not None and self.node is not None and self._announce_lock
        report = AnnounceReport()
        async with self._announce_lock:
            with trio.move_on_after(ANNOUNCE_TIMEOUT):
                await self.registry.announce(
                    self._uids, state=self._state, load=self._load, addrs=self._addrs(),
                    zmq=self.zmq_endpoint, reachability=self.reachability, report=report,
                    shards=self._shards, free=self._free)
        self.last_announce = report
        return report

    def _addrs(self) -> list[str]:
        """Addresses for the records: a private node with relay reservations gives only
        its circuit addresses (nobody outside its LAN can dial the others)."""
        assert self.node is not None
        relay = list(getattr(self.nat, "relay_addrs", []) or [])
        if relay and self.reachability == "private":
            return relay[:16]
        # Loopback addresses last: useful only on this machine.
        direct = sorted(self.node.multiaddrs(), key=lambda a: a.startswith("/ip4/127."))
        return (direct + relay)[:16]

    async def _heartbeat(self) -> None:
        while True:
            await trio.sleep(self.heartbeat_interval)
            if self._uids:
                try:
                    await self._announce_now()
                    self.heartbeats += 1
                except Exception as e:
                    log.warning("heartbeat announce failed: %r", e)

    async def _withdraw(self, timeout: float) -> None:
        assert self.registry is not None
        with trio.move_on_after(timeout):
            await self.registry.announce([], state="draining", load=self._load)

    # ------------------------------------------------------------------ snapshot
    def snapshot(self) -> dict:
        """JSON-serialisable view for the dashboard's network section."""
        node = self.node
        nat_snap: dict = {}
        if self.nat is not None:
            try:
                nat_snap = self.nat.snapshot()
            except Exception as e:
                nat_snap = {"error": f"{type(e).__name__}: {e}"}
        peers = nat_snap.get("connections") or _count_connections(node)
        boot = node.bootstrap_state if node is not None else None
        last = self.last_announce
        return {
            "peer_id": self.peer_id,
            "addrs": self.multiaddrs,
            "experiment": self.experiment,
            "reachability": self.reachability,
            "relay": nat_snap.get("relay"),
            "relay_addrs": nat_snap.get("relay_addrs", []),
            "peers": {k: int(peers.get(k, 0)) for k in ("direct", "relayed", "hole_punched")},
            "connected_peers": len(node.host.get_connected_peers()) if node is not None else 0,
            "routing_table": node.dht.get_routing_table_size() if node is not None else 0,
            "dht_mode": "server" if self.dht_server else "client",
            "bootstrap": {"peers": len(self.bootstrap), "attempts": boot.attempts if boot else 0,
                          "successes": boot.successes if boot else 0,
                          "last_error": boot.last_error if boot else None},
            "new_swarm": not self.bootstrap,
            "records_announced": self.registry.records_announced if self.registry else 0,
            "announced_uids": len(self._uids),
            "state": self._state,
            "last_announce_ok": last.ok if last is not None else None,
            "heartbeats": self.heartbeats,
            "zmq_endpoint": self.zmq_endpoint,
            "rpc": self.rpc.stats.as_dict() if self.rpc is not None else None,
            "shard_server": self.shard_server.stats.as_dict() if self.shard_server is not None else None,
            "nat": {k: v for k, v in nat_snap.items() if k not in ("connections",)},
        }


def _listen_error(host: str, port: int) -> ListenError:
    """Why listening on host:port failed, as far as a probe bind can tell (libp2p hides it)."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    code, reason = errno.EADDRNOTAVAIL, "the address was refused"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        code, reason = exc.errno or code, exc.strerror or str(exc)
    return ListenError(code, where, reason)


class _SwarmNat(NatTraversal):
    """NatTraversal whose advice stays quiet when there is nobody to ask (see module docstring)."""

    def advice(self) -> str | None:
        if self.reachability == rb.UNKNOWN and not self.relays and not self.bootstrap:
            return None  # alone in a new swarm: nothing is wrong and nothing to fix
        return super().advice()


def _make_nat(node: SwarmNode, relays: list[str], bootstrap: Sequence[str], public: str) -> NatTraversal:
    """NAT traversal (reachability, relays, hole punching), run as a trio service."""
    return _SwarmNat(node.host, relays, allow_hop=public != "no", bootstrap=list(bootstrap),
                     assume_public=public == "yes")


def _count_connections(node: SwarmNode | None) -> dict[str, int]:
    counts = {"direct": 0, "relayed": 0, "hole_punched": 0}
    if node is None:
        return counts
    for conns in node.host.get_network().connections.values():
        for conn in conns if isinstance(conns, list) else [conns]:
            relayed = any("/p2p-circuit" in str(a) for a in _addrs_of(conn))
            counts["relayed" if relayed else "direct"] += 1
    return counts


def _addrs_of(conn: Any) -> list:
    getter = getattr(getattr(conn, "muxed_conn", None), "get_transport_addresses", None)
    try:
        return list(getter()) if callable(getter) else []
    except Exception:
        return []

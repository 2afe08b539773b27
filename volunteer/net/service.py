"""NetworkService: the volunteer daemon's peer-network facade (trio + libp2p in a thread).

    config = NetworkConfig.from_section(manifest.network, listen_host="0.0.0.0")
    svc = NetworkService(home, "demo", config, submit=runtime.submit,
                         zmq_endpoint="tcp://203.0.113.5:5555", limits=manifest.serving)
    svc.start()                         # listening, bootstrapped (or a new swarm), NAT ready
    svc.announce(uids, "serving", load) # published before it returns; heartbeats follow
    svc.set_draining()                  # re-announced as draining before it returns
    svc.shards.holders(uids)            # who holds which shard (``shard_network.py``)
    ch = svc.open_channel("/volunteer/averaging/1.0.0", ChannelLimits(...))
    ch.serve(submit); ch.request(peer, addrs, frames, timeout)  # ``protocol_channel.py``
    svc.stop()                          # withdraws the records (best effort), stops

Configuration is typed: a frozen ``NetworkConfig`` (``volunteer.net.config``; a manifest
``network`` section is converted with ``NetworkConfig.from_section``) and the node's one
``ServingLimits``, which reaches the libp2p RPC server as it reaches the ZeroMQ frontend
(message bounds, bytes in flight), so both frontends refuse the same requests.

Thread ownership: the node, registry, NAT traversal, RPC server and shard network are
created in the trio thread and owned by it. The sync facade reads them only through the
bridge (``TrioThread.run_sync`` / ``call``): ``snapshot()``, ``multiaddrs``, ``open_channel``,
``reachability`` and ``dht_server`` run in the loop and return plain values, and
``announce`` / ``set_load`` hand their values to the loop. Reaches into py-libp2p
internals go through ``volunteer.net.libp2p_adapter``.

Inside the thread: ``SwarmNode`` (host with the persistent identity from
``<home>/identity/``, KadDHT in server or client mode (below), self-healing bootstrap),
``RpcServer`` (expert RPC over streams into ``submit``), ``NatTraversal`` from
``volunteer.net.nat`` (reachability by dial-back, relay reservations, hole punching), and
a heartbeat that re-announces every ``ttl / 2`` seconds (sooner after a failed one). Records carry the direct ZeroMQ
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

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IHost

from volunteer.manifest.admission import OPEN, AdmissionSpec
from volunteer.net import dht_store, records
from volunteer.net import libp2p_adapter as lp
from volunteer.net.admission import AdmissionError, AdmissionPolicy
from volunteer.net.admission_files import load_token
from volunteer.net.config import NetworkConfig, NetworkSection, network_config
from volunteer.net.dht_guard import DhtGuard, install_dht_guard
from volunteer.net.dialing import dial
from volunteer.net.host import default_listen_host, load_or_create_identity, peer_id_of
from volunteer.net.listen_error import ListenError, find_listen_error, listen_error
from volunteer.net.nat import reachability as rb
from volunteer.net.nat.traversal import NatTraversal
from volunteer.net.node import NodeConfig, SwarmNode
from volunteer.net.protocol_channel import ChannelLimits, ProtocolChannel
from volunteer.net.registry import AnnounceReport, ExpertRegistry
from volunteer.net.rpc_server import RpcServer
from volunteer.net.service_snapshot import service_snapshot
from volunteer.net.shard_network import ShardNetwork
from volunteer.net.shard_rpc import SHARD_PROTOCOL_ID, ShardServer
from volunteer.net.stream_io import PROTOCOL_ID
from volunteer.net.trio_thread import TrioThread, TrioThreadError
from volunteer.runtime.limits import ServingLimits

log = logging.getLogger(__name__)

ANNOUNCE_TIMEOUT = 20.0
_BUILTIN_PROTOCOLS = (PROTOCOL_ID, SHARD_PROTOCOL_ID)


class NetworkService:
    """Sync facade over the node's trio thread (see module docstring)."""

    def __init__(self, home: Path, experiment: str, network: NetworkConfig | NetworkSection | None = None,
                 submit: Callable[[list, Callable[[list], None]], None] | None = None,
                 zmq_endpoint: str | None = None, *, limits: ServingLimits | None = None,
                 shard_server: ShardServer | None = None, listen_host: str | None = None,
                 ttl: float | None = None, heartbeat_interval: float | None = None,
                 enable_nat: bool | None = None, dht_mode_interval: float | None = None,
                 admission: AdmissionSpec = OPEN) -> None:
        """``network``: a ``NetworkConfig`` (or a manifest ``network`` section, converted);
        the keyword overrides (``listen_host``, ``ttl``, ...) replace its fields when given.
        ``limits``: the node's serving limits, applied by the libp2p RPC server.
        ``admission``: the manifest's admission section; when it is not open, only admitted
        peers' records are read or stored, and this node needs its own token (installed with
        ``volunteer admission install``): ``AdmissionError`` (one line, the fix) otherwise."""
        self.home = Path(home)
        self.experiment = experiment
        self.config = network_config(network, listen_host=listen_host, ttl=ttl,
                                     heartbeat_interval=heartbeat_interval, enable_nat=enable_nat,
                                     dht_mode_interval=dht_mode_interval)
        cfg = self.config
        self.limits = limits if limits is not None else ServingLimits()
        self.submit = submit
        self.zmq_endpoint = zmq_endpoint
        self.listen_host = cfg.listen_host or default_listen_host()
        self.listen_port = cfg.listen_port
        self.key_pair = load_or_create_identity(self.home / "identity")  # NodeHome.identity_dir
        self._peer_id = peer_id_of(self.key_pair).to_base58()
        self.admission = AdmissionPolicy.from_spec(admission, experiment)
        self.admission_token = None if self.admission.open else load_token(self.home, experiment)
        refusal = self.admission.explain(self._peer_id, self.admission_token)
        if refusal is not None:
            raise AdmissionError(refusal)
        # What this node accepts from records: expiry within the record TTL it announces
        # with (the experiment's), and only admitted signers when the experiment is closed.
        self.record_policy = records.RecordPolicy(
            max_ttl=cfg.ttl, admit=None if self.admission.open else self.admission.admits_entry)
        self.dht_guard: DhtGuard | None = None
        self.node_config = NodeConfig(
            listen_addrs=(f"/ip4/{self.listen_host}/tcp/{self.listen_port}",),
            announce_addrs=cfg.announce_addrs,
            bootstrap=cfg.bootstrap,
            bootstrap_origins=cfg.origins,
            dht_server=self._initial_dht_server(),
        )
        # Owned by the trio thread (created there; read elsewhere only through the bridge).
        self.node: SwarmNode | None = None
        self.registry: ExpertRegistry | None = None
        self.rpc: RpcServer | None = None
        self.nat: NatTraversal | None = None
        self._announced_reachability: str | None = None  # in the records last announced
        self.shard_server = shard_server
        self.shards: ShardNetwork | None = None
        self._thread = TrioThread(name="volunteer-net")
        self._uids: list[str] = []
        self._shards: dict[str, tuple[int, bytes]] = {}
        self._free = 0
        self._state = "serving"
        self._load = 0.0
        self._announce_lock: trio.Lock | None = None
        self._nursery: trio.Nursery | None = None
        self.channels: dict[str, ProtocolChannel] = {}
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
        except BaseException as exc:
            err = self._listen_error or find_listen_error(exc)  # unwrapped from trio's exception groups
            if err is not None:
                raise err from None
            raise
        return self

    async def _main(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        self.node = SwarmNode(self.key_pair, self.node_config)
        dht_store.configure_dht(self.node.dht, self.record_policy)
        # Per-peer limits in front of py-libp2p's DHT handler (one peer cannot hold them all).
        self.dht_guard = install_dht_guard(self.node.host, self.node.dht)
        self.registry = ExpertRegistry(self.node.dht, self.key_pair, self.experiment, ttl=self.config.ttl,
                                       admission_token=self.admission_token)
        self._announce_lock = trio.Lock()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.node.run)
            if not self.node.host.get_addrs():
                self._listen_error = listen_error(self.listen_host, self.listen_port)
                raise self._listen_error
            if self.submit is not None:
                self.rpc = _rpc_server(self.node.host, self.submit, self.limits, self.config)
                self.rpc.install()
            if self.config.enable_nat:
                self.nat = _make_nat(self.node, self.config)
                await nursery.start(self.nat.run)
            self.shards = ShardNetwork(self._thread, self.node.host, nursery, self.registry, self._connect,
                                       self.shard_server, limits=self.limits)
            await self._apply_dht_mode()
            nursery.start_soon(self._dht_mode_watch)
            nursery.start_soon(self._heartbeat)
            task_status.started(self)

    def _initial_dht_server(self) -> bool:
        if self.config.public in ("yes", "no"):
            return self.config.public == "yes"
        # auto: a new swarm (nobody to ask) or no NAT check serves at once; otherwise
        # start as a client and decide when the reachability check is done.
        return not self.config.bootstrap or not self.config.enable_nat

    def wants_dht_server(self) -> bool:
        """The mode rule (see module docstring): serve the DHT unless known private."""
        if self.config.public in ("yes", "no"):
            return self.config.public == "yes"
        return self.reachability != "private"

    @property
    def dht_server(self) -> bool:
        """True while this node serves the DHT (answers queries, stores records)."""
        return self._thread.run_sync(self._dht_server_now)

    def _dht_server_now(self) -> bool:
        self._thread.check_owner("the DHT mode")
        return self.node is not None and lp.dht_is_server(self.node.dht)

    async def _apply_dht_mode(self) -> None:
        assert self.node is not None
        want = self.wants_dht_server()
        if await self.node.set_dht_server(want):
            log.info("DHT %s mode (reachability %s)", "server" if want else "client",
                     self.reachability)

    async def _dht_mode_watch(self) -> None:
        """Re-apply the DHT mode rule when reachability changed, and announce the new
        reachability at once (records with a stale one mislead trainers and `volunteer swarm`)."""
        while True:
            await trio.sleep(self.config.dht_mode_interval)
            if self.wants_dht_server() != self.dht_server:
                try:
                    await self._apply_dht_mode()
                except Exception as e:  # keep serving in the current mode; retry later
                    log.warning("DHT mode switch failed: %r", e)
            announced = self._announced_reachability
            if self._uids and announced is not None and announced != self.reachability:
                try:
                    await self._announce_now()
                except Exception as e:  # the heartbeat announces it later
                    log.warning("announcing the new reachability failed: %r", e)

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
        """Addresses (with /p2p/<id>) that other peers dial (read in the loop)."""
        return self._thread.run_sync(self._multiaddrs_now)

    def _multiaddrs_now(self) -> list[str]:
        self._thread.check_owner("the host's addresses")
        return self.node.multiaddrs() if self.node is not None else []

    @property
    def listen_addrs(self) -> list[str]:
        """The transport addresses the host listens on (the real port, also when announcing
        other addresses), without /p2p; read in the loop."""
        return self._thread.run_sync(self._listen_addrs_now)

    def _listen_addrs_now(self) -> list[str]:
        self._thread.check_owner("the host's listen addresses")
        return [str(a) for a in self.node.host.get_transport_addrs()] if self.node is not None else []

    @property
    def reachability(self) -> str:
        """public / private / unknown: the manifest's ``public`` choice, else the NAT check."""
        if self.config.public == "yes":
            return "public"
        if self.config.public == "no":
            return "private"
        return self._thread.run_sync(self._nat_reachability_now)

    def _nat_reachability_now(self) -> str:
        self._thread.check_owner("the NAT reachability")
        return self.nat.reachability if self.nat is not None else "unknown"

    def announce(self, uids: Sequence[str], state: str = "serving", load: float = 0.0,
                 shards: Mapping[str, tuple[int, bytes]] | None = None, free: int | None = None) -> AnnounceReport:
        """Publish the hosted uids now (returns when stored) and keep them alive.

        ``shards``: uid -> (version, root) of the shard this node hands out for it (kept
        when None); ``free``: how many more experts it would take (kept when None).
        """
        return self._thread.call(self._announce_update, list(uids), state, float(load),
                                 None if shards is None else dict(shards), None if free is None else int(free))

    async def _announce_update(self, uids: list[str], state: str, load: float,
                               shards: dict[str, tuple[int, bytes]] | None, free: int | None) -> AnnounceReport:
        self._uids, self._state, self._load = uids, state, load
        if shards is not None:
            self._shards = shards
        if free is not None:
            self._free = free
        return await self._announce_now()

    async def _connect(self, peer_id: Any, addrs: list[str]) -> None:
        """Connector for shard traffic: direct, else relayed and then hole-punched."""
        await dial(self.node.host if self.node is not None else None, self.nat, peer_id, addrs,
                   timeout=20.0, upgrade_timeout=5.0)

    def set_load(self, load: float) -> None:
        """Update the load carried by the next heartbeat (handed to the loop, never waits)."""
        if self._thread.running and not self._thread.in_loop():
            try:
                self._thread.call_soon(self._set_load_now, float(load))
                return
            except TrioThreadError:
                pass  # the loop stopped meanwhile: no owner left
        self._load = float(load)

    def _set_load_now(self, load: float) -> None:
        self._load = load

    def set_draining(self) -> AnnounceReport | None:
        """Mark every hosted expert draining and re-announce at once."""
        if not self._thread.running:
            self._state = "draining"
            return None
        return self._thread.call(self._drain_now)

    async def _drain_now(self) -> AnnounceReport | None:
        self._state = "draining"
        return await self._announce_now() if self._uids else None

    async def _announce_now(self) -> AnnounceReport:
        assert self.registry is not None and self.node is not None and self._announce_lock
        report = AnnounceReport()
        async with self._announce_lock:
            self._announced_reachability = self.reachability
            with trio.move_on_after(ANNOUNCE_TIMEOUT):
                await self.registry.announce(
                    self._uids, state=self._state, load=self._load, addrs=self._addrs(),
                    zmq=self.zmq_endpoint, reachability=self._announced_reachability, report=report,
                    shards=self._shards, free=self._free)
        self.last_announce = report
        return report

    def _addrs(self) -> list[str]:
        """Addresses for the records: a private node with relay reservations gives only
        its circuit addresses (nobody outside its LAN can dial the others)."""
        assert self.node is not None
        relay = list(self.nat.relay_addrs) if self.nat is not None else []
        if relay and self.reachability == "private":
            return relay[:16]
        # Loopback addresses last: useful only on this machine.
        direct = sorted(self.node.multiaddrs(), key=lambda a: a.startswith("/ip4/127."))
        return (direct + relay)[:16]

    async def _heartbeat(self) -> None:
        delay = self.config.heartbeat_s
        while True:
            await trio.sleep(delay)
            delay = self.config.heartbeat_s
            if self._uids:
                try:
                    report = await self._announce_now()
                    self.heartbeats += 1
                    if not report.ok:  # some key stored nowhere: try again before it expires
                        delay = self.config.heartbeat_s / 3
                except Exception as e:
                    log.warning("heartbeat announce failed: %r", e)
                    delay = self.config.heartbeat_s / 3

    async def _withdraw(self, timeout: float) -> None:
        assert self.registry is not None
        with trio.move_on_after(timeout):
            await self.registry.announce([], state="draining", load=self._load)

    # ------------------------------------------------------------------ more protocols
    def open_channel(self, protocol: str, limits: ChannelLimits) -> ProtocolChannel:
        """Serve and call one more protocol on this host (``protocol_channel.py``), with the
        node's connector (direct, else relayed, then hole-punched); ValueError if served."""
        return self._thread.run_sync(self._open_channel_now, protocol, limits)

    def _open_channel_now(self, protocol: str, limits: ChannelLimits) -> ProtocolChannel:
        self._thread.check_owner("the host's protocols")
        if self.node is None or self._nursery is None:
            raise TrioThreadError("the network service is not running")
        if protocol in self.channels or protocol in _BUILTIN_PROTOCOLS:
            raise ValueError(f"protocol {protocol} is served already")
        channel = ProtocolChannel(self._thread, self.node.host, self._nursery, protocol, limits,
                                  connector=self._connect)
        self.channels[protocol] = channel
        return channel

    # ------------------------------------------------------------------ snapshot
    def snapshot(self) -> dict:
        """JSON-serialisable view for the dashboard's network section (built in the loop)."""
        return self._thread.run_sync(self._snapshot_now)

    def _snapshot_now(self) -> dict:
        """The snapshot; reads loop-owned state, so it runs in the loop (or with no loop)."""
        self._thread.check_owner("the network snapshot")
        return service_snapshot(self)


class _SwarmNat(NatTraversal):
    """NatTraversal whose advice stays quiet when there is nobody to ask (see module docstring)."""

    def advice(self) -> str | None:
        if self.reachability == rb.UNKNOWN and not self.relays and not self.bootstrap:
            return None  # alone in a new swarm: nothing is wrong and nothing to fix
        return super().advice()


def _make_nat(node: SwarmNode, config: NetworkConfig) -> NatTraversal:
    """NAT traversal (reachability, relays, hole punching), run as a trio service."""
    return _SwarmNat(node.host, list(config.relays), allow_hop=config.public != "no",
                     bootstrap=list(config.bootstrap), assume_public=config.public == "yes",
                     bootstrap_origins=config.origins)


def _rpc_server(host: IHost, submit: Callable[[list, Callable[[list], None]], None], limits: ServingLimits,
                config: NetworkConfig) -> RpcServer:
    """The libp2p expert-RPC frontend with the node's limits: the message bounds of
    ``limits.wire()`` (as the ZeroMQ frontend decodes with), at most
    ``limits.max_queued_bytes`` of requests held in flight, and ``config.peer_limits``."""
    return RpcServer(host, submit, limits.wire(), max_inflight_bytes=limits.max_queued_bytes,
                     peer_limits=config.peer_limits)  # type: ignore[arg-type]

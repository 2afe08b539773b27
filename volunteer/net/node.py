"""A swarm member inside trio: libp2p host + KadDHT + bootstrap that heals itself.

``SwarmNode(key_pair, NodeConfig(...))`` is the async core shared by the volunteer
daemon's ``NetworkService`` (DHT server) and the trainer's ``ClientNode`` (DHT client):

- listens on ``listen_addrs``, advertises ``announce_addrs`` when set;
- bootstraps from the manifest's peers: every address is tried concurrently, a peer that
  answers is added to the DHT routing table and a self-lookup fills the table;
- keeps a watchdog: whenever the node has no connected peer at all it bootstraps again,
  with exponential backoff and jitter (0.5 s doubling to 30 s), so a node that lost every
  peer (network change, bootstrap restart) rejoins by itself;
- with no bootstrap peers it simply starts a new swarm: ``multiaddrs()`` are what others
  put in their manifest;
- ``set_dht_server(on)`` switches between DHT server and client mode at run time (the
  daemon serves the DHT only once its reachability check says others can dial it): the
  KAD handler is added or removed, connected peers are told at once by identify/push, and
  on becoming a server a self-lookup opens KAD streams so peers add it to their tables.

Run it with ``await nursery.start(node.run)``; it is ready when ``run`` reports started
(the first bootstrap round has finished, successful or not).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import trio
from libp2p.crypto.keys import KeyPair
from libp2p.identity.identify_push.identify_push import push_identify_to_peers
from libp2p.kad_dht.kad_dht import DHTMode
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service import background_trio_service

from volunteer.net.dht_routing import closest_peers, sessions_of
from volunteer.net.dht_store import make_dht
from volunteer.net.dialing import RECENT, classify_dial_error
from volunteer.net.host import (
    DEFAULT_LISTEN,
    build_host,
    full_multiaddrs,
    parse_peer_addr,
    quiet_libp2p_logging,
    run_host,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeConfig:
    """Network settings of one node (the daemon maps manifest + settings onto this)."""

    listen_addrs: Sequence[str] = DEFAULT_LISTEN
    announce_addrs: Sequence[str] = ()
    bootstrap: Sequence[str] = ()
    # where each bootstrap address came from, in words ("the --bootstrap flag"), for errors
    bootstrap_origins: Mapping[str, str] = field(default_factory=dict)
    dht_server: bool = True
    connect_timeout: float = 10.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    watch_interval: float = 1.0


@dataclass
class BootstrapState:
    """The bootstrap loop's progress. ``errors``: per bootstrap address, the last real dial
    failure with where the address came from; ``last_error`` joins them. A retry that
    py-libp2p's dialer skipped (its negative cache: "failed moments ago") changes neither."""

    attempts: int = 0
    successes: int = 0
    last_error: str | None = None
    connected: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


class SwarmNode:
    """Host + DHT + self-healing bootstrap (see module docstring)."""

    def __init__(self, key_pair: KeyPair, config: NodeConfig) -> None:
        quiet_libp2p_logging()
        self.key_pair = key_pair
        self.config = config
        self.host = build_host(key_pair, announce_addrs=config.announce_addrs or None)
        self.dht = make_dht(self.host, server=config.dht_server)
        self.peer_id = self.host.get_id()
        self.bootstrap_peers: list[PeerInfo] = []
        self._bootstrap_addr: dict[int, str] = {}  # id(PeerInfo) -> the address as configured
        for addr in config.bootstrap:
            info = parse_peer_addr(addr)
            if info.peer_id != self.peer_id:
                self.bootstrap_peers.append(info)
                self._bootstrap_addr[id(info)] = addr
        self.bootstrap_state = BootstrapState()
        self.nursery: trio.Nursery | None = None

    def multiaddrs(self) -> list[str]:
        """Addresses (with /p2p/<id>) that other peers dial or list as bootstrap peers."""
        return full_multiaddrs(self.host)

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self.host.get_connected_peers()]

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with run_host(self.host, self.config.listen_addrs), \
                background_trio_service(self.dht):
            quiet_libp2p_logging()
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                if self.bootstrap_peers:
                    await self.bootstrap_once()
                nursery.start_soon(self._watchdog)
                task_status.started(self)
                await trio.sleep_forever()

    async def bootstrap_once(self) -> int:
        """Try every bootstrap peer concurrently; return how many answered.

        A failure is kept per address with its origin (``BootstrapState.errors``); a retry
        the dialer skipped because the last dial failed moments ago keeps the real failure."""
        st = self.bootstrap_state
        st.attempts += 1
        ok: list[str] = []
        failed: dict[str, tuple[str, str]] = {}  # address -> (kind, words)

        async def one(info: PeerInfo) -> None:
            try:
                with trio.fail_after(self.config.connect_timeout):
                    await self.host.connect(info)
                    await self.dht.add_peer(info.peer_id)
                ok.append(info.peer_id.to_base58())
            except Exception as e:
                failed[self._bootstrap_addr.get(id(info), str(info.peer_id))] = classify_dial_error(
                    e, info.addrs, info.peer_id.to_base58(), self.config.connect_timeout)

        async with trio.open_nursery() as nursery:
            for info in self.bootstrap_peers:
                nursery.start_soon(one, info)
        if ok:
            st.successes += 1
            st.connected = ok
            st.last_error = None
            st.errors.clear()
            # Self-lookup (bounded, live peers only) fills the routing table.
            with trio.move_on_after(self.config.connect_timeout):
                try:
                    await closest_peers(self.dht, self.peer_id.to_bytes())
                except Exception as e:
                    log.debug("self-lookup failed: %r", e)
        else:
            real = {addr: words for addr, (kind, words) in failed.items() if kind != RECENT}
            for addr, words in real.items():
                st.errors[addr] = f"{words} (address from {self._origin(addr)})"
            recent = [words for kind, words in failed.values() if kind == RECENT]
            st.last_error = ("; ".join(st.errors.values()) or "; ".join(recent)
                             or "no bootstrap peer answered")[:500]
            if real:
                log.info("bootstrap failed: %s", "; ".join(st.errors[a] for a in real)[:500])
            else:  # the dialer did not dial again yet: nothing new to say
                log.debug("bootstrap retry skipped by the dialer: %s", "; ".join(recent)[:500])
        return len(ok)

    def _origin(self, addr: str) -> str:
        """Where a bootstrap address came from, in words (configured by the daemon)."""
        return self.config.bootstrap_origins.get(addr) or "the node's bootstrap list"

    @property
    def dht_server(self) -> bool:
        """True while the DHT runs in server mode (answers KAD queries, stores records)."""
        return self.dht.mode == DHTMode.SERVER

    async def set_dht_server(self, server: bool) -> bool:
        """Switch the DHT to server or client mode; return True when the mode changed.

        Peers learn the new protocol list by identify/push (bounded). Then a self-lookup
        on fresh KAD streams (idle reused ones are closed first) refills the routing
        table (py-libp2p empties it on a switch to client mode) and, for a new server,
        makes peers add it to their tables (they add only peers whose identify lists
        KAD). A new client is dropped from their tables the first time it refuses a KAD
        stream.
        """
        if server == self.dht_server:
            return False
        await self.dht.switch_mode(DHTMode.SERVER if server else DHTMode.CLIENT)
        with trio.move_on_after(self.config.connect_timeout):
            try:
                await push_identify_to_peers(self.host)
            except Exception as e:
                log.debug("identify push failed: %r", e)
            # Fresh KAD streams: peers vet a peer for their table when it opens one.
            await sessions_of(self.dht).close()
            try:
                await closest_peers(self.dht, self.peer_id.to_bytes())
            except Exception as e:
                log.debug("self-lookup failed: %r", e)
        return True

    async def _watchdog(self) -> None:
        delay = self.config.backoff_initial
        while True:
            if self.bootstrap_peers and not self.host.get_connected_peers():
                if await self.bootstrap_once():
                    delay = self.config.backoff_initial
                    continue
                await trio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.config.backoff_max)
            else:
                await trio.sleep(self.config.watch_interval)

"""NatTraversal: one trio service that makes a node reachable, whatever its NAT.

Started by NetworkService with ``await nursery.start(nat.run)``. In order:

1. serve dial-back checks for others (``reachability.DialbackServer``);
2. connect to the configured relays / bootstrap peers and ask them to dial us back on a
   fresh connection -> ``reachability`` is ``public`` / ``private`` / ``unknown``;
3. run Circuit Relay v2 (``relay.RelayNode``): HOP only when ``allow_hop`` *and* the node
   is public; a non-public node reserves a slot on up to ``max_reservations`` relays
   (configured ones first, then connected peers that speak the HOP protocol) and
   announces the circuit addresses (``relay_addrs``);
4. run DCUtR (``holepunch.HolePuncher``) so relayed connections upgrade to direct ones;
5. ``task_status.started()``; then every ``maintain_interval`` s: re-reserve on relays
   that were lost (connection gone, e.g. the relay restarted) and, while reachability is
   still unknown, ask for a dial-back again. (HOP is decided once, at start.)
6. while reachability is unknown (e.g. the founder of a new swarm: nobody to ask at start),
   peers that connect directly are asked for a dial-back too (``check_connected_peers``):
   at most ``MAX_PEER_CHECKS`` peers per round, one round per ``recheck_interval`` s, each
   peer at most once per ``peer_recheck_s`` s. Their proof (a fresh connection that reached
   us) makes the node public; their "could not reach you" alone does not make it private:
   an unconfigured peer's word must not take a node out of DHT serving.

``snapshot()`` gives the dashboard its NAT section, ``connect()`` reaches a peer by its
announced addresses (direct first, then through a relay; DCUtR upgrades it later),
``connection_kind(conn)`` says direct / relayed / hole_punched.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import trio
from libp2p.abc import IHost, INetConn
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from multiaddr import Multiaddr

from volunteer.net.nat import reachability as rb
from volunteer.net.nat.connections import RELAYED, ConnectionLedger
from volunteer.net.nat.holepunch import HolePuncher
from volunteer.net.nat.relay import RelayError, RelayNode, RelaySettings, is_circuit_addr, peer_info

logger = logging.getLogger(__name__)

MAX_PEER_CHECKS = 3  # connected peers asked for a dial-back per round while unknown


class NatTraversal:
    """Reachability, relay reservations and hole punching for one libp2p host."""

    def __init__(
        self,
        host: IHost,
        relays: list[str],
        allow_hop: bool,
        *,
        bootstrap: list[str] | None = None,
        relay_settings: RelaySettings | None = None,
        max_reservations: int = 2,
        check_timeout: float = 15.0,
        dial_timeout: float = 4.0,
        maintain_interval: float = 30.0,
        enable_holepunch: bool = True,
        assume_public: bool = False,
        bootstrap_origins: Mapping[str, str] | None = None,
        recheck_poll: float = 1.0,
        recheck_interval: float = 10.0,
        peer_recheck_s: float = 300.0,
    ) -> None:
        self.host = host
        self.relays = list(relays)
        self.bootstrap = list(bootstrap or [])
        self.bootstrap_origins = dict(bootstrap_origins or {})  # address -> where it came from
        self.allow_hop = allow_hop
        self.max_reservations = max_reservations
        self.check_timeout = check_timeout
        self.maintain_interval = maintain_interval
        self.enable_holepunch = enable_holepunch
        self.assume_public = assume_public
        self.relay_settings = relay_settings or RelaySettings()
        self.dialback_server = rb.DialbackServer(host, dial_timeout=dial_timeout)
        self.reachability: str = rb.UNKNOWN
        self.observed_ip: str | None = None
        self.public_addrs: list[str] = []
        self.answers: list[rb.DialbackAnswer] = []
        self.relay_node: RelayNode | None = None
        self.puncher: HolePuncher | None = None
        self.reservation_errors: dict[str, str] = {}
        self.started_at = time.monotonic()
        self.ready_after_s: float | None = None
        self.recheck_poll = recheck_poll
        self.recheck_interval = recheck_interval
        self.peer_recheck_s = peer_recheck_s
        self._asked: dict[ID, float] = {}  # connected peer -> when it was last asked (monotonic)
        self._last_peer_check = float("-inf")

    # ------------------------------------------------------------ public view
    @property
    def relay_addrs(self) -> list[str]:
        return self.relay_node.relay_addrs() if self.relay_node else []

    @property
    def hop_enabled(self) -> bool:
        return bool(self.relay_node and self.relay_node.allow_hop)

    @property
    def ledger(self) -> ConnectionLedger | None:
        return self.puncher.ledger if self.puncher else None

    def connection_kind(self, conn: Any) -> str:
        """``direct`` / ``relayed`` / ``hole_punched`` for one of the host's connections."""
        ledger = self.ledger or ConnectionLedger(punching=lambda _pid: False)
        return ledger.kind(conn)

    def advice(self) -> str | None:
        """Why this node cannot be reached directly and what to do; None when public."""
        origins = [self.bootstrap_origins.get(a, "the manifest's network.bootstrap") for a in self.bootstrap]
        return rb.explain(self.reachability, rb.listen_ports(self.host), self.observed_ip,
                          self.relay_addrs, len(self.relays), bootstrap_origins=origins)

    def snapshot(self) -> dict:
        ledger = self.ledger or ConnectionLedger(punching=lambda _pid: False)
        relay_addrs = self.relay_addrs
        return {
            "reachability": self.reachability,
            "observed_ip": self.observed_ip,
            "public_addrs": list(self.public_addrs),
            "relay": relay_addrs[0].split("/p2p-circuit")[0] if relay_addrs else None,
            "relay_addrs": relay_addrs,
            "hop_enabled": self.hop_enabled,
            "connections": ledger.counts(self.host),
            "hole_punches": ledger.hole_punches,
            # of which landed after our own DCUtR session ended; punch budgets given back
            "hole_punches_late": self.puncher.sessions.late if self.puncher else 0,
            "punch_retries": self.puncher.retries if self.puncher else 0,
            "reservation_errors": dict(self.reservation_errors),
            "dialback_checks_served": self.dialback_server.checks_served,
            "ready_after_s": self.ready_after_s,
            "advice": self.advice(),
        }

    # ------------------------------------------------------------ the service
    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.dialback_server.install()
        await self.check_reachability()
        self.relay_node = RelayNode(self.host, allow_hop=self.allow_hop and self.reachability == rb.PUBLIC,
                                    settings=self.relay_settings)
        async with self.relay_node.running():
            self.puncher = HolePuncher(self.host)
            async with contextlib.AsyncExitStack() as stack:
                if self.enable_holepunch:
                    await stack.enter_async_context(self.puncher.running())
                if self.reachability != rb.PUBLIC:
                    await self.ensure_reservations()
                self.ready_after_s = round(time.monotonic() - self.started_at, 3)
                task_status.started()
                advice = self.advice()
                if advice:
                    logger.warning("%s", advice)
                await self._maintain()

    async def _maintain(self) -> None:
        """Steps 5 and 6 of the module docstring, in one task (no two checks at once)."""
        next_round = time.monotonic() + self.maintain_interval
        while True:
            unknown = self.reachability == rb.UNKNOWN and not self.assume_public
            await trio.sleep(self.recheck_poll if unknown else max(0.0, next_round - time.monotonic()))
            now = time.monotonic()
            if unknown and now - self._last_peer_check >= self.recheck_interval \
                    and self._fresh_direct_peers():
                self._last_peer_check = now
                await self.check_connected_peers()
            if time.monotonic() < next_round:
                continue
            next_round = time.monotonic() + self.maintain_interval
            if self.reachability == rb.UNKNOWN:  # nobody answered yet: ask again
                await self.check_reachability()
            if self.reachability != rb.PUBLIC:
                await self.ensure_reservations()

    def _fresh_direct_peers(self) -> list[ID]:
        """Peers connected directly (not through a relay: the server would see the relay's
        IP) that were not asked in the last ``peer_recheck_s`` s, at most MAX_PEER_CHECKS."""
        now, me = time.monotonic(), self.host.get_id()
        network = self.host.get_network()
        fresh: list[ID] = []
        for pid in list(network.connections):
            if pid == me or now - self._asked.get(pid, float("-inf")) < self.peer_recheck_s:
                continue
            with contextlib.suppress(Exception):
                if any(not c.is_closed and self.connection_kind(c) != RELAYED
                       for c in network.get_connections(pid)):
                    fresh.append(pid)
            if len(fresh) >= MAX_PEER_CHECKS:
                break
        return fresh

    async def check_connected_peers(self) -> str:
        """Ask directly connected peers not asked lately for a dial-back (step 6 of the
        module docstring); only a proof that one reached us changes ``reachability``."""
        peers, ports = self._fresh_direct_peers(), rb.listen_ports(self.host)
        if not peers or not ports:
            return self.reachability
        answers: list[rb.DialbackAnswer] = []
        async with trio.open_nursery() as nursery:
            for pid in peers:
                self._asked[pid] = time.monotonic()

                async def ask(pid: ID = pid) -> None:
                    answers.append(await rb.ask_dialback(self.host, pid, ports, timeout=self.check_timeout))
                nursery.start_soon(ask)
        if len(self._asked) > 4096:  # bounded: forget the oldest
            for pid in sorted(self._asked, key=self._asked.__getitem__)[:len(self._asked) - 4096]:
                del self._asked[pid]
        if self.reachability != rb.UNKNOWN or rb.decide(answers) != rb.PUBLIC:
            return self.reachability
        self.answers = answers
        self.reachability = rb.PUBLIC
        observed = [a.observed_ip for a in answers if a.observed_ip and a.reachable]
        self.observed_ip = observed[0] if observed else None
        self.public_addrs = sorted({addr for a in answers for addr in a.reachable})
        logger.info("reachability: public (a connected peer dialled this node back at %s)",
                    ", ".join(self.public_addrs) or "its address")
        return self.reachability

    async def check_reachability(self) -> str:
        """Ask the relays / bootstrap peers for a dial-back; sets ``reachability``.

        With ``assume_public`` (a node its operator declares public, e.g. the first
        bootstrap/relay node of a swarm, which has nobody to ask) the check is skipped.
        """
        if self.assume_public:
            self.reachability = rb.PUBLIC
            return self.reachability
        ports = rb.listen_ports(self.host)
        servers = await self._connect_any(self.relays + self.bootstrap)
        answers: list[rb.DialbackAnswer] = []
        if ports and servers:
            async with trio.open_nursery() as nursery:
                for server in servers[:3]:
                    async def ask(server: ID = server) -> None:
                        answers.append(await rb.ask_dialback(self.host, server, ports,
                                                             timeout=self.check_timeout))
                    nursery.start_soon(ask)
        self.answers = answers
        self.reachability = rb.decide(answers)
        observed = [a.observed_ip for a in answers if a.observed_ip]
        self.observed_ip = observed[0] if observed else None
        self.public_addrs = sorted({addr for a in answers for addr in a.reachable})
        return self.reachability

    async def _connect_any(self, addrs: list[str]) -> list[ID]:
        connected: list[ID] = []

        async def one(addr: str) -> None:
            try:
                info = peer_info(addr)
                with trio.fail_after(self.check_timeout):
                    await self.host.connect(info)
            except Exception as e:
                logger.info("cannot connect to %s: %s", addr, e)
                return
            if info.peer_id not in connected and info.peer_id != self.host.get_id():
                connected.append(info.peer_id)

        async with trio.open_nursery() as nursery:
            for addr in dict.fromkeys(addrs):
                nursery.start_soon(one, addr)
        return connected

    def _swarm_relays(self) -> list[str]:
        """Connected peers that announced the HOP protocol (relays found in the swarm)."""
        found: list[str] = []
        store = self.host.get_peerstore()
        for pid in list(self.host.get_network().connections):
            with contextlib.suppress(Exception):
                if HOP_PROTOCOL not in (store.get_protocols(pid) or []):
                    continue
                for a in store.addrs(pid):
                    s = str(a)
                    if not is_circuit_addr(s) and "/ip4/" in s:
                        found.append(f"{s}/p2p/{pid.to_base58()}" if "/p2p/" not in s else s)
                        break
        return found

    async def ensure_reservations(self) -> None:
        """Hold reservations on up to ``max_reservations`` relays (configured first)."""
        node = self.relay_node
        if node is None:
            return
        have = {a.split("/p2p-circuit")[0] for a in node.relay_addrs()}
        for addr in dict.fromkeys(self.relays + self._swarm_relays()):
            if len(have) >= self.max_reservations:
                break
            if addr in have:
                continue
            try:
                await node.reserve(addr, timeout=self.check_timeout)
                have.add(addr)
                self.reservation_errors.pop(addr, None)
            except RelayError as e:
                self.reservation_errors[addr] = str(e)[:300]
                logger.info("relay reservation failed: %s", e)

    async def connect(self, addrs: list[str], timeout: float = 20.0,
                      direct_timeout: float = 3.0, upgrade_timeout: float = 0.0) -> INetConn | None:
        """Connect to a peer by its announced addresses (each ending in ``/p2p/<id>``).

        An existing connection is reused. Otherwise direct addresses are tried first
        (for at most ``direct_timeout`` s when circuit addresses exist too: a NATed peer's
        LAN addresses just time out), then the circuit addresses through their relays.
        A relayed connection is upgraded by DCUtR in the background; with
        ``upgrade_timeout`` > 0 this call waits that long for the hole punch first (so
        streams opened next use the direct connection). Returns the best connection
        (direct before relayed), None when every address failed.
        """
        direct = [a for a in addrs if not is_circuit_addr(a) and "/p2p/" in a]
        circuits = [a for a in addrs if is_circuit_addr(a)]
        peers = {peer_info(a).peer_id for a in direct + circuits if _parses(a)}
        conn = self._best_connection(peers)
        if conn is None and direct:
            with contextlib.suppress(Exception):
                info = peer_info(direct[0])
                extra = [Multiaddr(a.split("/p2p/")[0]) for a in direct[1:]]
                with trio.fail_after(direct_timeout if circuits else timeout):
                    await self.host.connect(PeerInfo(info.peer_id, list(info.addrs) + extra))
                conn = self._best_connection(peers)
        if conn is None and self.relay_node is not None:
            for addr in circuits:
                with contextlib.suppress(RelayError):
                    conn = await self.relay_node.dial_circuit(addr, timeout=timeout)
                    break
        if conn is not None and upgrade_timeout > 0 and self.puncher is not None \
                and self.enable_holepunch and self.connection_kind(conn) == RELAYED:
            await self.puncher.upgrade(conn.muxed_conn.peer_id, timeout=upgrade_timeout)
            conn = self._best_connection(peers) or conn
        return conn

    def _best_connection(self, peers: set[ID]) -> INetConn | None:
        """An open connection to one of ``peers``, direct ones first."""
        best = None
        for pid in peers:
            for c in self.host.get_network().get_connections(pid):
                if c.is_closed:
                    continue
                if self.connection_kind(c) != RELAYED:
                    return c
                best = best or c
        return best


def _parses(addr: str) -> bool:
    try:
        peer_info(addr)
    except Exception:
        return False
    return True

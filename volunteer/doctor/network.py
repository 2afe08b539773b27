"""The doctor's network probe: a throwaway libp2p peer asks the swarm about this machine.

``probe_network(plan)`` runs one trio program (``trio.run``) with an identity of its own, never
the node's (the probe must not collide with a running daemon's peer id): kept in
``<home>/cache/doctor-identity/`` when the home exists, so repeated runs reuse one relay
reservation (a relay keeps a reservation for its TTL, an hour, after the peer left: fresh
identities would each take a slot), else ephemeral. It answers, each step under its own
deadline:

1. which bootstrap peers complete the libp2p handshake (a TCP answer with a failing
   handshake usually means a wrong ``/p2p/<peer id>`` in the address);
2. reachability by dial-back over a *fresh* connection (``net.nat.traversal.NatTraversal``,
   the check the daemon runs; ``reachability.py`` avoids AutoNAT's false positives):
   public / private / unknown, and the IP peers see;
3. a relay: a reservation on the manifest's relays or on a connected peer that speaks
   Circuit Relay v2 HOP (only when this node is not public: a public node needs none);
4. the experiment's grid records (``census.read_grid``): their signed timestamps give the
   clock skew (``clock.py``), their circuit addresses a peer to test a hole punch with
   (DCUtR through its relay; "not offered" when no volunteer is reached through a relay).

Only the bootstrap peers whose TCP port answered (``bootstrap.probe_tcp``) are dialled, so
an offline doctor does not wait on libp2p at all.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volunteer.net.records import ServerEntry

CONNECT_TIMEOUT_S = 5.0
CHECK_TIMEOUT_S = 6.0
RELAY_TIMEOUT_S = 6.0
RELAY_BUDGET_S = 12.0  # all relay candidates together
RELAYED_DIAL_TIMEOUT_S = 8.0
PUNCH_TIMEOUT_S = 15.0  # a punch lands in ~1 s, now and then ~10 s (8 s missed 1 of 2 in the NAT lab)
MAX_RELAY_TRIES = 3
MAX_ERROR_CHARS = 200


@dataclass(frozen=True)
class ProbePlan:
    """What to probe: the live bootstrap addresses, relays, where to listen, the grid."""

    experiment: str
    bootstrap: tuple[str, ...]
    relays: tuple[str, ...]
    listen_host: str
    listen_port: int
    grid_prefix: str
    grid_dims: tuple[int, ...]
    census_timeout: float = 8.0
    identity_dir: Path | None = None  # where the probe's own key is kept (None: ephemeral)


@dataclass
class ProbeResult:
    """What the probe found (plain data; the checks turn it into verdicts)."""

    peer_id: str = ""
    connected: list[str] = field(default_factory=list)  # bootstrap peer ids that answered libp2p
    bootstrap_error: str | None = None
    reachability: str = "unknown"
    observed_ip: str | None = None
    public_addrs: list[str] = field(default_factory=list)
    dialback_errors: list[str] = field(default_factory=list)
    listen_ports: list[int] = field(default_factory=list)
    relay: str | None = None  # the relay we reserved on (or that speaks HOP, when public)
    relay_errors: dict[str, str] = field(default_factory=dict)
    relays_seen: int = 0
    entries: list[ServerEntry] = field(default_factory=list)
    read_at: float = 0.0
    census_unanswered: int = 0
    punch_peer: str | None = None
    punch_kind: str | None = None  # hole_punched / direct / relayed / None (no route)
    punch_error: str | None = None
    error: str | None = None  # the probe itself failed (e.g. cannot listen)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:MAX_ERROR_CHARS]


def probe_network(plan: ProbePlan) -> ProbeResult:
    """Run the probe (blocking, bounded by the per-step deadlines); never raises."""
    import trio

    result = ProbeResult()
    try:
        trio.run(_probe, plan, result)
    except BaseException as exc:  # an exception group out of libp2p's nurseries
        if isinstance(exc, KeyboardInterrupt):
            raise
        result.error = _short(_leaf(exc))
    return result


def _listen_addr(plan: ProbePlan) -> str:
    family = "ip6" if ":" in plan.listen_host else "ip4"
    return f"/{family}/{plan.listen_host}/tcp/{plan.listen_port}"


def _leaf(exc: BaseException) -> BaseException:
    inner = getattr(exc, "exceptions", None)
    while isinstance(inner, tuple) and inner:
        exc = inner[0]
        inner = getattr(exc, "exceptions", None)
    return exc


async def _probe(plan: ProbePlan, result: ProbeResult) -> None:
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair

    from volunteer.net.nat import reachability as rb
    from volunteer.net.nat.traversal import NatTraversal
    from volunteer.net.node import NodeConfig, SwarmNode
    from volunteer.net.registry import ExpertRegistry

    key = create_new_key_pair()
    if plan.identity_dir is not None:
        from volunteer.net.host import load_or_create_identity

        with contextlib.suppress(Exception):  # unwritable or odd: an ephemeral key will do
            key = load_or_create_identity(plan.identity_dir)
    node = SwarmNode(key, NodeConfig(listen_addrs=(_listen_addr(plan),),
                                     bootstrap=plan.bootstrap, dht_server=False,
                                     connect_timeout=CONNECT_TIMEOUT_S))
    result.peer_id = node.peer_id.to_base58()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(CONNECT_TIMEOUT_S + 10):
            await nursery.start(node.run)
        result.connected = list(node.bootstrap_state.connected)
        result.bootstrap_error = node.bootstrap_state.last_error
        result.listen_ports = rb.listen_ports(node.host)
        if not result.connected:
            nursery.cancel_scope.cancel()
            return
        nat = NatTraversal(node.host, list(plan.relays), allow_hop=False, bootstrap=list(plan.bootstrap),
                           max_reservations=0, check_timeout=CHECK_TIMEOUT_S, dial_timeout=CHECK_TIMEOUT_S / 2)
        try:
            with trio.fail_after(3 * CHECK_TIMEOUT_S):
                await nursery.start(nat.run)
        except trio.TooSlowError:
            result.dialback_errors.append(f"the dial-back check took over {3 * CHECK_TIMEOUT_S:g} s")
            nursery.cancel_scope.cancel()
            return
        result.reachability = nat.reachability
        result.observed_ip = nat.observed_ip
        result.public_addrs = list(nat.public_addrs)
        result.dialback_errors = [f"{a.server[:12]}: {a.error}"[:MAX_ERROR_CHARS] for a in nat.answers if a.error]
        with trio.move_on_after(RELAY_BUDGET_S):
            await _relay(nat, node.host, plan, result)
        if plan.grid_dims:
            from volunteer.doctor.census import read_grid

            registry = ExpertRegistry(node.dht, key, plan.experiment)
            with trio.move_on_after(plan.census_timeout + 2):
                census = await read_grid(registry, plan.grid_prefix, plan.grid_dims,
                                         timeout=plan.census_timeout)
                result.entries = [e for es in census.entries.values() for e in es]
                result.census_unanswered = len(census.unanswered)
        result.read_at = time.time()
        await _holepunch(nat, node.host, result)
        nursery.cancel_scope.cancel()


def _hop_peers(host: Any) -> list[str]:
    """Connected peers that announce Circuit Relay v2 HOP (full multiaddrs)."""
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL

    found: list[str] = []
    store = host.get_peerstore()
    for pid in list(host.get_network().connections):
        with contextlib.suppress(Exception):
            if HOP_PROTOCOL not in (store.get_protocols(pid) or []):
                continue
            for a in store.addrs(pid):
                s = str(a)
                if "/p2p-circuit" not in s and ("/ip4/" in s or "/ip6/" in s):
                    found.append(s if "/p2p/" in s else f"{s}/p2p/{pid.to_base58()}")
                    break
    return found


async def _relay(nat: Any, host: Any, plan: ProbePlan, result: ProbeResult) -> None:
    """Reserve on a relay when not public; when public, only note a HOP-capable peer."""
    from volunteer.net.nat.relay import RelayError

    candidates = list(dict.fromkeys([*plan.relays, *_hop_peers(host)]))
    result.relays_seen = len(candidates)
    if result.reachability == "public":
        result.relay = candidates[0] if candidates else None
        return
    if nat.relay_node is None:
        return
    for addr in candidates[:MAX_RELAY_TRIES]:
        try:
            await nat.relay_node.reserve(addr, timeout=RELAY_TIMEOUT_S)
        except RelayError as exc:
            result.relay_errors[addr] = str(exc)[:MAX_ERROR_CHARS]
            continue
        except Exception as exc:  # a relay that misbehaves is one failed candidate
            result.relay_errors[addr] = _short(exc)
            continue
        result.relay = addr
        return


async def _holepunch(nat: Any, host: Any, result: ProbeResult) -> None:
    """Reach a volunteer that announces a circuit address; try to punch through to it."""
    import trio

    from volunteer.net.dialing import full_addrs
    from volunteer.net.nat.connections import RELAYED

    me = host.get_id().to_base58()
    offered = [e for e in result.entries if e.peer_id != me and any("/p2p-circuit" in a for a in e.addrs)]
    if not offered:
        return
    entry = offered[0]
    result.punch_peer = entry.peer_id
    try:
        from libp2p.peer.id import ID

        pid = ID.from_base58(entry.peer_id)
        with trio.move_on_after(RELAYED_DIAL_TIMEOUT_S + PUNCH_TIMEOUT_S + 2):
            conn = await nat.connect(full_addrs(pid, entry.addrs), timeout=RELAYED_DIAL_TIMEOUT_S,
                                     direct_timeout=2.0, upgrade_timeout=PUNCH_TIMEOUT_S)
            if conn is None:
                result.punch_error = "no direct or relayed route"
                return
            kind = nat.connection_kind(conn)
            result.punch_kind = kind
            if kind == RELAYED:
                result.punch_error = "the connection stayed relayed (DCUtR found no direct path)"
            return
        result.punch_error = "timed out"
    except Exception as exc:
        result.punch_error = _short(exc)

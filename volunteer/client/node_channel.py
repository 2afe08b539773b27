"""The averaging side of a trainer's ``ClientNode``: channel, answerer, groups, reachability.

``NodeAveraging(client)`` is created by ``ClientNode.averaging_group`` the first time a
trainer averages, and holds, for the node's lifetime:

- the node's ``PeerChannel``: a ``volunteer.net.protocol_channel.ProtocolChannel`` for
  ``/volunteer/averaging/1.0.0`` on the node's host (inbound: an ``RpcServer`` with every
  expert-RPC bound and the *authenticated* sender's peer id; outbound: an ``RpcClient``
  through the node's connector, so members behind NATs are reached through their relay and
  then hole-punched), with ``AVERAGING_CHANNEL`` limits (messages bounded by
  ``AVERAGING_LIMITS`` both ways; one largest message fits the in-flight budget);
- one ``ExchangeServer`` (all of this node's groups share its worker pool);
- each group's ``DhtMembership`` (withdrawn when the group or the node closes).

Reachability: a trainer that only calls experts dials out and needs no relay. A trainer that
averages must be reachable by the other members, so (unless the node runs with
``nat=False``) joining a group starts the node's ``NatTraversal`` and, when the node is not
public, lets it hold up to ``RESERVATIONS`` relay reservations. The member's entry then
carries the addresses ``NetworkService`` would announce: only the relay circuit addresses
when the node is private and has a reservation (its LAN addresses would cost every peer a
direct-dial timeout first), else its direct addresses (loopback last) followed by any
circuit addresses.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from volunteer.client.averaging.membership import DhtMembership, group_prefix
from volunteer.client.averaging.swarm_group import ExchangeServer, SwarmGroup
from volunteer.client.averaging.wire import AVERAGING_LIMITS, PROTOCOL
from volunteer.net import records
from volunteer.net.protocol_channel import ChannelLimits, ProtocolChannel
from volunteer.net.registry import ExpertRegistry

if TYPE_CHECKING:
    from volunteer.client.node import ClientNode

RESERVATIONS = 2
AVERAGING_CHANNEL = ChannelLimits(
    limits=AVERAGING_LIMITS, reply_limits=AVERAGING_LIMITS,
    max_inflight_bytes=AVERAGING_LIMITS.max_bytes + AVERAGING_LIMITS.max_header_bytes)


class NodeAveraging:
    """What one ``ClientNode`` holds for averaging (see module docstring)."""

    def __init__(self, client: ClientNode, *, limits: ChannelLimits = AVERAGING_CHANNEL) -> None:
        self.client = client
        thread = client._thread
        self.channel: ProtocolChannel = thread.run_sync(self._open, limits)
        self.server = ExchangeServer(self.channel)
        self.reachable = False
        self._lock = threading.Lock()
        self._groups: dict[str, SwarmGroup | None] = {}  # prefix -> group (None: joining)

    def _open(self, limits: ChannelLimits) -> ProtocolChannel:
        c = self.client
        return ProtocolChannel(c._thread, c.node.host, c.nursery, PROTOCOL, limits,
                               connector=c._nat_connect if c.use_nat else None)

    def make_reachable(self) -> None:
        """Start NAT traversal with relay reservations (once; waits for the reachability
        check and, when not public, for the reservations)."""
        if self.reachable or not self.client.use_nat:
            return
        self.client.call(self._reserve)
        self.reachable = True

    async def _reserve(self) -> None:
        c = self.client
        await c._ensure_nat()
        nat = c.nat
        if nat is None or c.nat_error is not None:
            return
        nat.max_reservations = max(nat.max_reservations, RESERVATIONS)
        if nat.reachability != "public":
            await nat.ensure_reservations()

    def addrs(self) -> list[str]:
        """The member's addresses for its entry (in the loop; see module docstring)."""
        c = self.client
        nat = c.nat
        relay = list(nat.relay_addrs) if nat is not None else []
        if relay and nat.reachability == "private":
            return relay[: records.MAX_ADDRS]
        direct = sorted(c.node.multiaddrs(), key=lambda a: a.startswith("/ip4/127."))
        return (direct + relay)[: records.MAX_ADDRS]

    def reachability(self) -> str:
        nat = self.client.nat
        return str(nat.reachability) if nat is not None else "unknown"

    def group(self, run_id: str, *, admit: records.Admit | None = None,
              admission_token: bytes | None = None, ttl: float = 30.0,
              compression: str | None = None, cache_s: float = 2.0,
              lookup_timeout: float | None = None, members_only: bool = True) -> SwarmGroup:
        """Join run ``run_id``'s group: announce, and return the ``SwarmGroup``."""
        c = self.client
        prefix = group_prefix(run_id)
        with self._lock:
            if prefix in self._groups:
                raise ValueError(f"run_id: this node is already a member of {run_id!r}; "
                                 "close that group first")
            self._groups[prefix] = None
        try:
            registry = ExpertRegistry(c.node.dht, c.registry.key_pair, c.experiment, ttl=ttl,
                                      admission_token=admission_token)
            membership = DhtMembership(c._thread, registry, prefix, addrs=self.addrs,
                                       reachability=self.reachability, admit=admit,
                                       cache_s=cache_s,
                                       lookup_timeout=lookup_timeout or c.lookup_timeout)
            membership.start(c.nursery)
        except BaseException:
            with self._lock:
                self._groups.pop(prefix, None)
            raise

        def leave() -> None:
            membership.close()
            with self._lock:
                self._groups.pop(prefix, None)

        group = SwarmGroup(self.server, self.channel, prefix, c.peer_id, membership,
                           compression=compression, members_only=members_only, on_close=leave)
        with self._lock:
            self._groups[prefix] = group
        return group

    def close(self) -> None:
        """Leave every group (withdrawing the entries) and stop answering."""
        with self._lock:
            groups = [g for g in self._groups.values() if g is not None]
        for g in groups:
            g.close()
        self.server.close()

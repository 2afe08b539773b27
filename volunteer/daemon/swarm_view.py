"""What the DHT says about one experiment's grid, in the shapes the decisions need (pure).

``SwarmView(entries, me)`` wraps uid -> verified ``ServerEntry`` list (from
``ShardNetwork.holders``) and derives, without any I/O:

- ``holders()``: uid -> ``assignment.Holder`` list for ``plan_assignment`` (this node left
  out; the assignment clamps every number again);
- ``peers()``: peer id -> ``PeerSlots`` (free slots, load) for ``choose_adopter``;
- ``newest(uid)``: the newest shard another node announces for ``uid`` (version, root) and
  every holder announcing that very root (download sources: they all serve identical bytes);
- ``replicas(uid)``: who serves ``uid`` at which version, for ``volunteer status``.

Records are signed, which proves only who wrote them: versions and loads are numbers a peer
states about itself, so they only rank download sources of one root (all verified chunk by
chunk) and feed the assignment, which bounds them; they never select bytes unverified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from volunteer.experts.assignment import Holder, PeerSlots
from volunteer.net.record_fields import freshest_per_peer
from volunteer.net.records import ServerEntry, parent_pair
from volunteer.net.shard_download import Source


@dataclass(frozen=True)
class ShardOffer:
    """The newest shard of a uid in the swarm and the holders that announce it."""

    version: int
    root: bytes
    sources: tuple[Source, ...]


@dataclass
class SwarmView:
    """A read of the DHT for the grid (see module docstring)."""

    entries: Mapping[str, Sequence[ServerEntry]]
    me: str
    _child: dict[str, str] = field(default_factory=dict, repr=False)

    def _leaf(self, uid: str) -> str:
        if uid not in self._child:
            self._child[uid] = parent_pair(uid)[1]
        return self._child[uid]

    def others(self, uid: str) -> list[ServerEntry]:
        """Entries of other peers listing ``uid``, one per peer (the freshest)."""
        return freshest_per_peer(self.entries.get(uid, ()), skip=self.me)

    def holders(self) -> dict[str, list[Holder]]:
        out: dict[str, list[Holder]] = {}
        for uid in self.entries:
            child = self._leaf(uid)
            out[uid] = [Holder(e.peer_id, e.load, info.version if (info := e.shard(child)) else 0, e.state)
                        for e in self.others(uid)]
        return out

    def peers(self) -> dict[str, PeerSlots]:
        latest = freshest_per_peer(e for uid in self.entries for e in self.others(uid))
        return {e.peer_id: PeerSlots(free=e.free, load=e.load) for e in latest if e.state == "serving"}

    def addrs(self, peer_id: str) -> tuple[str, ...]:
        for uid in self.entries:
            for e in self.others(uid):
                if e.peer_id == peer_id:
                    return e.addrs
        return ()

    def newest(self, uid: str, exclude: Sequence[str] = ()) -> ShardOffer | None:
        """The highest-version shard others announce for ``uid`` (ties: most holders)."""
        child = self._leaf(uid)
        by_root: dict[bytes, tuple[int, list[Source]]] = {}
        for e in self.others(uid):
            info = e.shard(child)
            if info is None or e.peer_id in exclude:
                continue
            version, srcs = by_root.get(info.root, (info.version, []))
            srcs.append(_source(e))
            by_root[info.root] = (version, srcs)
        if not by_root:
            return None
        root, (version, srcs) = max(by_root.items(), key=lambda kv: (kv[1][0], len(kv[1][1]), kv[0]))
        return ShardOffer(version, root, tuple(srcs))

    def sources(self, uid: str, root: bytes) -> tuple[Source, ...]:
        """Every other holder announcing exactly ``root`` for ``uid``."""
        child = self._leaf(uid)
        return tuple(_source(e) for e in self.others(uid)
                     if (info := e.shard(child)) is not None and info.root == root)

    def replicas(self, uid: str) -> dict[str, int]:
        """peer id -> announced version, for the other peers serving ``uid``."""
        child = self._leaf(uid)
        return {e.peer_id: (info.version if (info := e.shard(child)) else 0)
                for e in self.others(uid) if e.state == "serving"}


def _source(e: ServerEntry) -> Source:
    """A download source; its ZeroMQ endpoint only when it says it is publicly reachable (as
    trainers decide; the download falls back to libp2p when the endpoint does not answer)."""
    return Source(e.peer_id, e.addrs, e.zmq if e.reachability == "public" else None)

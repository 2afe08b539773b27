"""Hand-off on leave: no trained weight is lost to the swarm when a volunteer goes.

After the drain and the final checkpoint, ``hand_off(manager, deadline)``:

1. encodes the final shard of every hosted expert (bitwise the final checkpoint: the runtime
   is drained, nothing changes in between) and announces it, state "draining", so adopters
   find this node as a holder in the DHT;
2. reads the swarm's view; a uid whose exact final shard (same root) another *serving* node
   already announces needs nothing;
3. for every other uid, offers it to the peer ``assignment.choose_adopter`` picks (free slots,
   then load; each assignment takes a slot so the uids spread), all offers at once; the
   adopter downloads the shard from this node (and any other holder), serves it, announces
   it, and only then answers; a refusal or failure moves on to the next best peer while the
   deadline allows;
4. returns one ``Handoff`` per uid: who took it over; or, when every other peer already
   serves its own replica of it (trained apart: replicas are not averaged yet), that the uid
   lives on there and this copy stays in the local checkpoint; or that it stayed only in the
   local checkpoint and why. The node's network stays up (serving chunks) until this returns.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from volunteer.experts.assignment import PeerSlots, choose_adopter
from volunteer.status.fmt import duration

log = logging.getLogger(__name__)

MIN_OFFER_S = 2.0


@dataclass
class Handoff:
    """What became of one hosted uid at leave."""

    uid: str
    version: int
    root: str
    outcome: str  # adopted | held | replicated | local_only
    peer: str | None = None
    detail: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "line": self.line()}

    def line(self) -> str:
        if self.outcome == "adopted":
            return f"handed off {self.uid} v{self.version} to {self.peer} in {duration(self.seconds)} ({self.detail})"
        if self.outcome == "held":
            return f"{self.uid} v{self.version}: {self.peer} already serves these exact weights"
        if self.outcome == "replicated":
            return f"{self.uid} v{self.version}: {self.detail}; this copy stays in the local checkpoint"
        return f"{self.uid} v{self.version} stayed only in the local checkpoint: {self.detail}"


def hand_off(manager: Any, deadline: float) -> list[Handoff]:
    """Make sure a live peer has every hosted uid (see module docstring)."""
    hosted = manager.hosted
    if manager.network is None:
        return [Handoff(u, *_snap(manager, u), "local_only", detail="the peer network is disabled") for u in hosted]
    manager.snapshot()
    manager.announce("draining")
    view = manager.read_view()
    holders = view.holders()
    slots = dict(view.peers())
    results: dict[str, Handoff] = {}
    offers: list[tuple[str, int, bytes]] = []
    for uid in hosted:
        version, root = manager.snapshots[uid]
        same = [s.name for s in view.sources(uid, root) if s.name in view.replicas(uid)]
        if same:
            results[uid] = Handoff(uid, version, root.hex()[:16], "held", peer=same[0])
        else:
            offers.append((uid, version, root))
    lock = threading.Lock()

    def offer(uid: str, version: int, root: bytes) -> None:
        tried: set[str] = set()
        replicas = view.replicas(uid)
        why = "no other serving volunteer in the swarm"
        start = time.monotonic()
        while deadline - time.monotonic() > MIN_OFFER_S:
            with lock:
                choices = {p: s for p, s in slots.items() if p not in tried}
                peer = choose_adopter(uid, manager._me(), choices, holders)
                if peer is None:
                    break
                tried.add(peer)
                s = slots[peer]
                slots[peer] = PeerSlots(free=max(0, s.free - 1), load=s.load)
            try:
                msg = manager.network.shards.offer(peer, view.addrs(peer), uid, version, root,
                                                   max(1.0, deadline - time.monotonic() - 1.0))
            except Exception as exc:
                why = f"{peer[-8:]} did not take it ({exc})"
                log.info("hand-off of %s to %s failed: %s", uid, peer, exc)
                continue
            results[uid] = Handoff(uid, version, root.hex()[:16], "adopted", peer=peer, detail=msg,
                                   seconds=time.monotonic() - start)
            return
        if deadline - time.monotonic() <= MIN_OFFER_S and not tried:
            why = "the leave deadline left no time to hand it off"
        if replicas and not tried:  # every other peer already serves its own (drifted) replica
            versions = ", ".join(f"v{v}" for v in sorted(replicas.values()))
            results[uid] = Handoff(uid, version, root.hex()[:16], "replicated", peer=min(replicas),
                                   detail=f"still served by {len(replicas)} other replica(s) at {versions}")
            return
        results[uid] = Handoff(uid, version, root.hex()[:16], "local_only", detail=why)

    threads = [threading.Thread(target=offer, args=job, daemon=True, name=f"volunteer-handoff-{job[0]}")
               for job in offers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 5.0)
    out = []
    for uid in hosted:
        h = results.get(uid)
        if h is None:
            version, root = manager.snapshots[uid]
            h = Handoff(uid, version, root.hex()[:16], "local_only", detail="the hand-off did not finish in time")
        out.append(h)
    return out


def _snap(manager: Any, uid: str) -> tuple[int, str]:
    version, root = manager.snapshots.get(uid, (0, b""))
    return version, root.hex()[:16]

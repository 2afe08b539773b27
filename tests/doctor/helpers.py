"""Records for the doctor's pure tests: ``entry(...)`` builds a ``ServerEntry`` as a reader
would hold it after verification (the fields a peer states about itself)."""

from __future__ import annotations

import time

from volunteer.net.records import ServerEntry, ShardInfo


def entry(peer: str, prefix: str, children: tuple[str, ...], *, version: int = 3, load: float = 0.1,
          state: str = "serving", reachability: str = "public", addrs: tuple[str, ...] = (),
          announced: float | None = None, ttl: float = 60.0, seq_bump: int = 0) -> ServerEntry:
    at = time.time() if announced is None else announced
    return ServerEntry(experiment="demo", prefix=prefix, peer_id=peer, seq=int(at * 1e9) + seq_bump,
                       expires=at + ttl, children=children, state=state, load=load,
                       addrs=addrs or (f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}",), zmq=None,
                       reachability=reachability,
                       shards=tuple(ShardInfo(c, version, b"\0" * 32) for c in children), free=2)

"""A volunteer's shard traffic: serve its shards, download others', offer hand-offs.

``ShardNetwork`` lives inside ``NetworkService``'s trio thread (built in its ``_main``) and
gives the daemon a synchronous API, each call bounded by a timeout:

- ``holders(uids)``: uid -> live signed entries (serving or draining) that list the uid,
  with the shard (version, root) each holder announces for it; one DHT lookup per parent
  prefix, bounded in concurrency;
- ``download(uid, fingerprint, root, sources, cache, progress)``: ``shard_download`` from
  every source at once over the shard protocol: a publicly reachable holder over its ZeroMQ
  endpoint (plain TCP) when the daemon set ``direct_transport``, the others over libp2p
  streams (direct, hole-punched or relayed: the same ``dialing.dial`` as expert calls);
- ``offer(peer_id, addrs, uid, version, root, timeout)``: ask a peer to adopt a uid before
  this node leaves; returns the adopter's message once it serves the uid.

The server side is the daemon's ``ShardServer`` installed on the host with ``RpcServer``
(``protocol=SHARD_PROTOCOL_ID``), so a shard request gets the same framing bounds and
per-stream backpressure as an expert call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import trio
from libp2p.peer.id import ID

from volunteer.net.records import ServerEntry
from volunteer.net.rpc_client import RpcClient
from volunteer.net.rpc_server import RpcServer
from volunteer.net.shard_download import DownloadProgress, Source, download_shard
from volunteer.net.shard_rpc import (
    REPLY_LIMITS,
    REQUEST_LIMITS,
    SHARD_PROTOCOL_ID,
    ShardClient,
    ShardRequestError,
    ShardServer,
    decode_reply,
)
from volunteer.net.trio_thread import TrioThread
from volunteer.wire.errors import UnreachableError

HOLDERS_TIMEOUT_S = 20.0
MAX_STREAMS_PER_PEER = 2


class ShardNetwork:
    """Shard client + server on one libp2p host (see module docstring)."""

    def __init__(self, thread: TrioThread, host: Any, nursery: trio.Nursery, registry: Any,
                 connector: Callable[[ID, list[str]], Any], server: ShardServer | None) -> None:
        self._thread = thread
        self.registry = registry
        self.rpc = RpcClient(host, nursery, REPLY_LIMITS, max_streams=MAX_STREAMS_PER_PEER,
                             connect_timeout=30.0, connector=connector, protocol=SHARD_PROTOCOL_ID)
        self.client = ShardClient(self.rpc)
        self.server = server
        # endpoint -> sync Transport (``request(frames, timeout)``), e.g. the client library's
        # ZmqTransport; set by the daemon. None: shards travel over libp2p only.
        self.direct_transport: Callable[[str], Any] | None = None
        self._transports: dict[str, Any] = {}
        if server is not None:
            RpcServer(host, server.submit, REQUEST_LIMITS, max_inflight=16, protocol=SHARD_PROTOCOL_ID).install()

    def holders(self, uids: Sequence[str], timeout: float = HOLDERS_TIMEOUT_S) -> dict[str, list[ServerEntry]]:
        """uid -> live entries listing it (see module docstring); {} entries on timeout."""
        async def run() -> dict[str, list[ServerEntry]]:
            with trio.move_on_after(timeout):
                return await self.registry.holders(list(uids))
            return {uid: [] for uid in uids}

        return self._thread.call(run)

    def download(self, uid: str, fingerprint: str, root: bytes, sources: Sequence[Source], cache: Any,
                 progress: DownloadProgress, timeout: float) -> Any:
        """Download ``root`` into ``cache``; returns the verified ``ShardHeader``."""
        srcs = [Source(ID.from_base58(s.peer_id) if isinstance(s.peer_id, str) else s.peer_id, tuple(s.addrs),
                       s.zmq) for s in sources]
        direct = {s.name: s.zmq for s in srcs if s.zmq} if self.direct_transport is not None else {}
        client = ShardClient(_Router(self, direct, progress))

        async def run() -> Any:
            with trio.fail_after(timeout):
                return await download_shard(client, cache, uid, fingerprint, root, srcs, progress)

        return self._thread.call(run)

    def transport(self, endpoint: str) -> Any:
        """The pooled direct transport to ``endpoint`` (one per endpoint, reused)."""
        assert self.direct_transport is not None
        if endpoint not in self._transports:
            self._transports[endpoint] = self.direct_transport(endpoint)
        return self._transports[endpoint]

    def close(self) -> None:
        for transport in self._transports.values():
            transport.close()
        self._transports.clear()

    def offer(self, peer_id: str, addrs: Sequence[str], uid: str, version: int, root: bytes,
              timeout: float) -> str:
        """Ask ``peer_id`` to adopt ``uid`` at ``version``/``root``; its message when it serves it."""
        pid = ID.from_base58(peer_id)

        async def run() -> str:
            return await self.client.adopt(pid, list(addrs), uid, version, root, timeout)

        return self._thread.call(run)


class _Router:
    """``call`` for ``ShardClient``: a holder's ZeroMQ endpoint when it has one (plain TCP, in a
    worker thread), its libp2p streams otherwise, and from the first failure to reach the
    endpoint on (a firewalled port) libp2p for that holder."""

    def __init__(self, net: ShardNetwork, direct: dict[str, str], progress: DownloadProgress) -> None:
        self.net = net
        self.direct = direct
        self.progress = progress

    async def call(self, peer_id: ID, addrs: Sequence[str], frames: list, timeout: float) -> list:
        name = peer_id.to_base58()
        endpoint = self.direct.get(name)
        if endpoint is not None:
            transport = self.net.transport(endpoint)
            try:
                reply = await trio.to_thread.run_sync(transport.request, frames, timeout, abandon_on_cancel=True)
                decode_reply(reply)
                self.progress.via[name] = "zmq"
                return reply
            except UnreachableError:  # firewalled or not listening there: libp2p from now on
                self.direct.pop(name, None)
            except ShardRequestError as e:
                if e.code != "unknown_shard":  # the holder's own answer: the downloader handles it
                    self.progress.via[name] = "zmq"
                    return reply
                self.direct.pop(name, None)  # somebody else answers at that endpoint
        reply = await self.net.rpc.call(peer_id, addrs, frames, timeout)
        self.progress.via[name] = "libp2p"
        return reply

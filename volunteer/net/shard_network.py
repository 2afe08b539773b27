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
(``protocol=SHARD_PROTOCOL_ID``), so a shard request gets the same framing bounds, per-stream
backpressure, per-peer limits and read/write deadlines as an expert call. Its byte budget
is sized for what a holder really holds: requests are tiny (under 100 bytes) while each one
may hold a chunk reply (``DEFAULT_CHUNK_BYTES``, 1 MiB) until it is written. ``RpcServer``
reserves a request's size until its reply is written, and every request that reads anything
is at least ``MIN_REQUEST_BYTES``, so ``shard_inflight_bytes`` turns a bound on chunk-reply
memory (``SHARD_REPLY_BYTES``, at most the node's ``ServingLimits.max_queued_bytes``) into
a bound on requests in flight, all peers together; ``SHARD_PEER_LIMITS`` bounds each peer.

``traffic`` (``volunteer.net.rate_limit.Traffic``: the node's bandwidth caps and byte meter)
throttles both sides: chunks served over libp2p (the shard ``RpcServer``) and downloads
(whatever path each chunk takes); set it at construction or later with ``set_traffic``.

``direct_transport`` (the ZeroMQ transport factory) is given to the constructor or set
from another thread with ``set_direct_transport``; the pooled transports are guarded by a
lock (created in the trio thread, closed from the daemon's).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import trio
from libp2p.peer.id import ID

from volunteer.experts.shard import DEFAULT_CHUNK_BYTES
from volunteer.net.peer_limits import SHARD_PEER_LIMITS, PeerLimits
from volunteer.net.rate_limit import Traffic
from volunteer.net.records import ServerEntry
from volunteer.net.rpc_client import RpcClient
from volunteer.net.rpc_server import RpcServer
from volunteer.net.shard_download import DownloadProgress, Source, download_shard
from volunteer.net.shard_rpc import (
    REPLY_LIMITS,
    REQUEST_LIMITS,
    ROOT_BYTES,
    SHARD_PROTOCOL_ID,
    ShardClient,
    ShardRequest,
    ShardRequestError,
    ShardServer,
    decode_reply,
    encode_request,
)
from volunteer.net.trio_thread import TrioThread
from volunteer.runtime.limits import ServingLimits
from volunteer.wire.errors import UnreachableError
from volunteer.wire.framing import frame_budget

HOLDERS_TIMEOUT_S = 20.0
MAX_STREAMS_PER_PEER = 2
MAX_INFLIGHT_PER_STREAM = 16
SHARD_REPLY_BYTES = 256 * 2**20  # chunk replies held in flight, all peers together (default)
MIN_INFLIGHT_REQUESTS = 32
MIN_REQUEST_BYTES = min(len(encode_request(ShardRequest(op, "x", bytes(ROOT_BYTES)))[0])
                        for op in ("header", "chunk"))
"""The smallest shard request that reads anything (a header or a chunk), as sent."""


def shard_inflight_bytes(reply_bytes: int) -> int:
    """The shard ``RpcServer``'s budget (counted in request bytes) that lets at most
    ``reply_bytes // DEFAULT_CHUNK_BYTES`` requests (at least ``MIN_INFLIGHT_REQUESTS``)
    hold a reply at once, and never refuses a well-formed request as too large."""
    requests = max(MIN_INFLIGHT_REQUESTS, reply_bytes // DEFAULT_CHUNK_BYTES)
    return max(requests * MIN_REQUEST_BYTES, frame_budget(REQUEST_LIMITS)[1])


class ShardNetwork:
    """Shard client + server on one libp2p host (see module docstring)."""

    def __init__(self, thread: TrioThread, host: Any, nursery: trio.Nursery, registry: Any,
                 connector: Callable[[ID, list[str]], Any], server: ShardServer | None, *,
                 limits: ServingLimits | None = None,
                 peer_limits: PeerLimits = SHARD_PEER_LIMITS,
                 direct_transport: Callable[[str], Any] | None = None,
                 traffic: Traffic | None = None) -> None:
        """``limits``: the node's serving limits (their ``max_queued_bytes`` caps the chunk
        replies held in flight, see module docstring); ``direct_transport``: endpoint ->
        sync ``Transport`` (e.g. the client library's ZmqTransport), None: libp2p only;
        ``traffic``: bandwidth caps and byte meter for shard traffic (None: uncapped)."""
        self._thread = thread
        self.traffic = traffic
        self.registry = registry
        self.rpc = RpcClient(host, nursery, REPLY_LIMITS, max_streams=MAX_STREAMS_PER_PEER,
                             connect_timeout=30.0, connector=connector, protocol=SHARD_PROTOCOL_ID)
        self.client = ShardClient(self.rpc)
        self.server = server
        self._lock = threading.Lock()  # guards the two fields below (trio + daemon threads)
        self._direct_transport = direct_transport
        self._transports: dict[str, Any] = {}
        self.reply_bytes = SHARD_REPLY_BYTES if limits is None else \
            min(SHARD_REPLY_BYTES, limits.max_queued_bytes)
        self.rpc_server: RpcServer | None = None
        if server is not None:
            self.rpc_server = RpcServer(host, server.submit, REQUEST_LIMITS,
                                        max_inflight=MAX_INFLIGHT_PER_STREAM,
                                        protocol=SHARD_PROTOCOL_ID,
                                        max_inflight_bytes=shard_inflight_bytes(self.reply_bytes),
                                        peer_limits=peer_limits, traffic=traffic)
            self.rpc_server.install()

    @property
    def direct_transport(self) -> Callable[[str], Any] | None:
        """The ZeroMQ transport factory (None: shards travel over libp2p only)."""
        with self._lock:
            return self._direct_transport

    @direct_transport.setter
    def direct_transport(self, factory: Callable[[str], Any] | None) -> None:
        self.set_direct_transport(factory)

    def set_direct_transport(self, factory: Callable[[str], Any] | None) -> None:
        """Set (or clear) the ZeroMQ transport factory; safe from any thread. Transports
        pooled from an earlier factory are kept until ``close``."""
        with self._lock:
            self._direct_transport = factory

    def set_traffic(self, traffic: Traffic | None) -> None:
        """Cap (and count) shard traffic from now on; None: uncapped. Safe from any thread
        (each request and download reads the attribute once)."""
        self.traffic = traffic
        if self.rpc_server is not None:
            self.rpc_server.traffic = traffic

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
                return await download_shard(client, cache, uid, fingerprint, root, srcs, progress,
                                            traffic=self.traffic)

        return self._thread.call(run)

    def transport(self, endpoint: str) -> Any:
        """The pooled direct transport to ``endpoint`` (one per endpoint, reused);
        ``UnreachableError`` when there is no factory (cleared, or closed)."""
        with self._lock:
            transport = self._transports.get(endpoint)
            if transport is None:
                if self._direct_transport is None:
                    raise UnreachableError("no direct transport: shards go over libp2p")
                transport = self._transports[endpoint] = self._direct_transport(endpoint)
            return transport

    def close(self) -> None:
        """Close the pooled direct transports and stop making new ones (any thread)."""
        with self._lock:
            transports = list(self._transports.values())
            self._transports.clear()
            self._direct_transport = None
        for transport in transports:
            transport.close()

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
            try:
                transport = self.net.transport(endpoint)
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

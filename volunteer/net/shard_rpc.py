"""Expert shards over libp2p streams: the ``/volunteer/shard/1.0.0`` protocol.

Any node that holds a complete shard (``volunteer.experts.shard``) can hand out any chunk of
it; the asker verifies every chunk against the header, and the header against the root hash
it found in the DHT, so a holder is trusted for nothing (BitTorrent's rule). The protocol
runs on the expert-RPC machinery (``RpcServer`` / ``RpcClient`` with another protocol id):
long-lived multiplexed streams, call ids, bounded framing, and whatever connection the node
has to the peer (direct, hole-punched or relayed).

Requests are one msgpack frame (at most ``REQUEST_LIMITS``):

- ``{"op": "header", "uid", "root"}`` -> the shard's header bytes;
- ``{"op": "chunk", "uid", "root", "i"}`` -> chunk ``i``;
- ``{"op": "adopt", "uid", "root", "version", "timeout"}`` -> "please take over this uid"
  from a leaving node; answered once the adopter serves it (or refuses).

The same requests also reach a holder over its ZeroMQ endpoint: the runtime hands frames its
wire decoder does not know to ``ShardServer.accepts`` / ``submit`` (``Runtime.side``), so a
publicly reachable holder serves chunks over plain TCP (no Noise, no yamux: several times the
libp2p stream's rate). Nothing is lost by skipping the encryption: every chunk is verified
against the root from the holder's signed record, whatever path it took.

Replies are ``[status, payload]``: ``status`` a msgpack map ``{"ok": True}`` or
``{"ok": False, "code", "msg"}``; ``payload`` the header / chunk bytes (empty otherwise).
Errors become ``ShardRequestError`` (with the holder's code) on the asking side.

``ShardServer.submit`` is what ``RpcServer`` calls in the trio thread: it decodes and bounds
the request there (cheap), then reads the chunk or runs the adoption in worker threads, so
neither disk reads nor an adoption ever block the network's event loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgpack

from volunteer.experts.shard import MAX_HEADER_BYTES, ShardError, ShardHeader, parse_header
from volunteer.wire.limits import WireLimits

log = logging.getLogger(__name__)

SHARD_PROTOCOL_ID = "/volunteer/shard/1.0.0"
MAX_CHUNK_BYTES = 64 << 20
MAX_STATUS_BYTES = 4096
MAX_UID_CHARS = 255
ROOT_BYTES = 32
MAX_ADOPT_TIMEOUT_S = 3600.0
REQUEST_LIMITS = WireLimits(max_header_bytes=1024, max_tensors=1, max_elements=1, max_bytes=1)
REPLY_LIMITS = WireLimits(max_header_bytes=MAX_STATUS_BYTES, max_tensors=1, max_elements=1,
                          max_bytes=max(MAX_CHUNK_BYTES, MAX_HEADER_BYTES))
OPS = ("header", "chunk", "adopt")

ReplyFn = Callable[[list], None]
# adopt(uid, version, root, timeout) -> (ok, message); blocks until the uid is served or refused
AdoptFn = Callable[[str, int, bytes, float], tuple[bool, str]]


class ShardRequestError(Exception):
    """A holder answered a shard request with an error (``code``: unknown_shard, busy, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ShardRequest:
    op: str
    uid: str
    root: bytes
    index: int = 0
    version: int = 0
    timeout: float = 0.0


def encode_request(req: ShardRequest) -> list[bytes]:
    body: dict[str, Any] = {"op": req.op, "uid": req.uid, "root": req.root}
    if req.op == "chunk":
        body["i"] = req.index
    if req.op == "adopt":
        body["version"] = req.version
        body["timeout"] = float(req.timeout)
    return [msgpack.packb(body, use_bin_type=True)]


def decode_request(frames: Sequence[bytes]) -> ShardRequest:
    """Parse and bound a request; ``ShardRequestError("bad_request", ...)`` when malformed."""
    try:
        if len(frames) != 1:
            raise ValueError("expected one frame")
        obj = msgpack.unpackb(frames[0], raw=False, strict_map_key=True)
        if not isinstance(obj, dict):
            raise ValueError("request must be a map")
        op, uid, root = obj.get("op"), obj.get("uid"), obj.get("root")
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}")
        if not isinstance(uid, str) or not 0 < len(uid) <= MAX_UID_CHARS:
            raise ValueError("uid must be a short string")
        if not isinstance(root, bytes) or len(root) != ROOT_BYTES:
            raise ValueError(f"root must be {ROOT_BYTES} bytes")
        index = _int(obj, "i", 0, 1 << 30) if op == "chunk" else 0
        version = _int(obj, "version", 0, 2**53) if op == "adopt" else 0
        timeout = 0.0
        if op == "adopt":
            timeout = obj.get("timeout")
            if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) \
                    or not 0 < timeout <= MAX_ADOPT_TIMEOUT_S:
                raise ValueError(f"timeout must be in (0, {MAX_ADOPT_TIMEOUT_S:g}]")
        return ShardRequest(op, uid, root, index, version, float(timeout))
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ShardRequestError("bad_request", str(e)[:200]) from None


def _int(obj: dict, key: str, lo: int, hi: int) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"{key} must be an int in [{lo}, {hi}]")
    return v


def ok_reply(payload: bytes = b"", **extra: Any) -> list[bytes]:
    return [msgpack.packb({"ok": True, **extra}, use_bin_type=True), payload]


def error_reply(code: str, message: str) -> list[bytes]:
    return [msgpack.packb({"ok": False, "code": code[:64], "msg": message[:500]}, use_bin_type=True), b""]


def decode_reply(frames: Sequence[bytes]) -> tuple[dict, bytes]:
    """(status map, payload) of a reply; raises ``ShardRequestError`` for error replies,
    including the transport's own refusals (``RpcServer`` answers an over-budget or
    rate-limited request with a one-frame wire error: its code, e.g. ``overloaded``, is kept)."""
    if len(frames) == 1:
        raise _wire_refusal(frames[0])
    if len(frames) != 2:
        raise ShardRequestError("bad_reply", f"expected 2 frames, got {len(frames)}")
    try:
        status = msgpack.unpackb(frames[0], raw=False, strict_map_key=True)
    except Exception:
        raise ShardRequestError("bad_reply", "status frame is not msgpack") from None
    if not isinstance(status, dict) or not isinstance(status.get("ok"), bool):
        raise ShardRequestError("bad_reply", "status frame must be a map with 'ok'")
    if not status["ok"]:
        code, msg = status.get("code"), status.get("msg")
        raise ShardRequestError(code if isinstance(code, str) else "error",
                                (msg if isinstance(msg, str) else "")[:500])
    return status, bytes(frames[1])


def _wire_refusal(frame: bytes) -> ShardRequestError:
    """The ``ShardRequestError`` for a one-frame reply: a wire error header
    (``volunteer.wire.messages.encode_error``) keeps its code, anything else is bad_reply."""
    try:
        if len(frame) <= MAX_STATUS_BYTES:
            header = msgpack.unpackb(frame, raw=False, strict_map_key=True)
            if isinstance(header, dict) and header.get("op") == "error":
                code, msg = header.get("code"), header.get("msg")
                if isinstance(code, str):
                    return ShardRequestError(code[:64], (msg if isinstance(msg, str) else "")[:500])
    except Exception:
        pass
    return ShardRequestError("bad_reply", "expected 2 frames, got 1")


@dataclass
class ShardServerStats:
    headers: int = 0
    chunks: int = 0
    bytes_out: int = 0
    adopt_requests: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class ShardServer:
    """Answers shard requests from a ``ShardCache`` (and adoption offers via ``adopt``)."""

    def __init__(self, cache: Any, adopt: AdoptFn | None = None, workers: int = 4,
                 max_adoptions: int = 8) -> None:
        self.cache = cache
        self.adopt = adopt
        self.stats = ShardServerStats()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="volunteer-shard-io")
        self._adoptions = threading.BoundedSemaphore(max_adoptions)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def accepts(frames: Sequence[Any]) -> bool:
        """True when ``frames`` look like a shard request (to route it from a shared socket)."""
        if len(frames) != 1 or len(frames[0]) > REQUEST_LIMITS.max_header_bytes:
            return False
        try:
            obj = msgpack.unpackb(frames[0], raw=False, strict_map_key=True)
        except Exception:
            return False
        return isinstance(obj, dict) and obj.get("op") in OPS

    def submit(self, frames: list, reply: ReplyFn) -> None:
        """``RpcServer`` entry point (trio thread): bound the request, then work elsewhere."""
        try:
            req = decode_request(frames)
        except ShardRequestError as e:
            self._count("errors")
            reply(error_reply(e.code, e.message))
            return
        if req.op == "adopt":
            self._count("adopt_requests")
            if self.adopt is None:
                reply(error_reply("refused", "this node does not adopt experts"))
                return
            if not self._adoptions.acquire(blocking=False):
                reply(error_reply("busy", "too many adoptions under way; ask another peer"))
                return
            threading.Thread(target=self._adopt, args=(req, reply), daemon=True,
                             name="volunteer-adopt").start()
            return
        try:
            self._pool.submit(self._read, req, reply)
        except RuntimeError:  # shut down
            reply(error_reply("unavailable", "node is stopping"))

    def _read(self, req: ShardRequest, reply: ReplyFn) -> None:
        try:
            # complete shards of the named uid only: a holder hands out what it can serve whole
            header = self.cache.header(req.root)
            if header is None or header.uid != req.uid or not self.cache.has_complete(req.root):
                raise KeyError(req.root)
            if req.op == "header":
                self._count("headers", len(header.raw))
                reply(ok_reply(header.raw))
            else:
                data = self.cache.read_chunk(req.root, req.index)
                self._count("chunks", len(data))
                reply(ok_reply(data))
        except KeyError:
            self._count("errors")
            reply(error_reply("unknown_shard", f"no complete shard {req.root.hex()[:16]} of {req.uid} here"))
        except ShardError as e:
            self._count("errors")
            reply(error_reply("bad_request", str(e)))
        except Exception as e:  # disk errors: answer, keep serving
            log.warning("serving shard %s failed: %r", req.root.hex()[:16], e)
            self._count("errors")
            reply(error_reply("internal", f"{type(e).__name__}"))

    def _adopt(self, req: ShardRequest, reply: ReplyFn) -> None:
        try:
            assert self.adopt is not None
            ok, message = self.adopt(req.uid, req.version, req.root, req.timeout)
            reply(ok_reply(msg=message[:500]) if ok else error_reply("refused", message))
        except Exception as e:
            log.exception("adoption of %s failed", req.uid)
            reply(error_reply("internal", f"adoption failed: {type(e).__name__}: {e}"))
        finally:
            self._adoptions.release()

    def _count(self, what: str, nbytes: int = 0) -> None:
        with self._lock:
            setattr(self.stats, what, getattr(self.stats, what) + 1)
            self.stats.bytes_out += nbytes


class ShardClient:
    """The asking side (trio): header, chunk and adopt calls over an ``RpcClient`` (or any
    object with the same async ``call(peer_id, addrs, frames, timeout)``)."""

    def __init__(self, rpc: Any) -> None:
        self.rpc = rpc

    async def _call(self, peer_id: Any, addrs: Sequence[str], req: ShardRequest,
                    timeout: float) -> tuple[dict, bytes]:
        frames = await self.rpc.call(peer_id, addrs, encode_request(req), timeout)
        return decode_reply(frames)

    async def header(self, peer_id: Any, addrs: Sequence[str], uid: str, root: bytes,
                     fingerprint: str, timeout: float) -> ShardHeader:
        """The verified header of ``root`` (hash, uid and fingerprint checked)."""
        _status, raw = await self._call(peer_id, addrs, ShardRequest("header", uid, root), timeout)
        return parse_header(raw, root=root, uid=uid, fingerprint=fingerprint)

    async def chunk(self, peer_id: Any, addrs: Sequence[str], uid: str, root: bytes, index: int,
                    timeout: float) -> bytes:
        """Chunk ``index`` as the holder sent it (the caller verifies it)."""
        _status, data = await self._call(peer_id, addrs, ShardRequest("chunk", uid, root, index), timeout)
        return data

    async def adopt(self, peer_id: Any, addrs: Sequence[str], uid: str, version: int, root: bytes,
                    timeout: float) -> str:
        """Ask a peer to take over ``uid``; returns its message once it serves it."""
        req = ShardRequest("adopt", uid, root, version=version, timeout=min(timeout, MAX_ADOPT_TIMEOUT_S))
        status, _ = await self._call(peer_id, addrs, req, timeout + 5.0)
        msg = status.get("msg")
        return msg if isinstance(msg, str) else ""

"""The shard protocol: request/reply codecs and their bounds, ``ShardServer`` over a real
``ShardCache``, and a download between two libp2p hosts on loopback."""

from __future__ import annotations

import threading

import msgpack
import pytest
import torch
import trio

from tests.net.swarm_helpers import swarm
from volunteer.experts.backend import ExpertBackend
from volunteer.experts.shard import decode_shard, encode_shard
from volunteer.experts.shard_cache import ShardCache
from volunteer.net.rpc_client import RpcClient
from volunteer.net.rpc_server import RpcServer
from volunteer.net.shard_download import DownloadProgress, Source, download_shard
from volunteer.net.shard_rpc import (
    MAX_ADOPT_TIMEOUT_S,
    MAX_UID_CHARS,
    REPLY_LIMITS,
    REQUEST_LIMITS,
    SHARD_PROTOCOL_ID,
    ShardClient,
    ShardRequest,
    ShardRequestError,
    ShardServer,
    decode_reply,
    decode_request,
    encode_request,
    error_reply,
    ok_reply,
)

UID = "g.0"
FP = "fp-test"
ROOT = bytes(range(32))

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def shard():
    torch.manual_seed(0)
    state = ExpertBackend(UID, "ffn", 64).state_dict()
    header, body = encode_shard(UID, FP, state, chunk_bytes=4096)
    return header, body, state


@pytest.fixture
def cache(tmp_path, shard):
    header, body, _ = shard
    c = ShardCache(tmp_path / "shards", 1 << 30)
    c.put_complete(header, body)
    return c


def raw(body: dict) -> list[bytes]:
    return [msgpack.packb(body, use_bin_type=True)]


# -- codecs ------------------------------------------------------------------------------


@pytest.mark.parametrize("req", [
    ShardRequest("header", UID, ROOT),
    ShardRequest("chunk", UID, ROOT, index=7),
    ShardRequest("chunk", "x" * MAX_UID_CHARS, ROOT, index=1 << 30),
    ShardRequest("adopt", UID, ROOT, version=2**53, timeout=MAX_ADOPT_TIMEOUT_S),
    ShardRequest("adopt", UID, ROOT, version=0, timeout=0.5),
])
def test_request_roundtrip(req):
    frames = encode_request(req)
    assert len(frames) == 1 and len(frames[0]) <= REQUEST_LIMITS.max_header_bytes
    assert decode_request(frames) == req


GOOD = {"op": "chunk", "uid": UID, "root": ROOT, "i": 0}
ADOPT = {"op": "adopt", "uid": UID, "root": ROOT, "version": 1, "timeout": 10.0}


@pytest.mark.parametrize("frames", [
    [],
    [*raw(GOOD), b""],  # an extra frame
    [b"\xc1"],  # not msgpack
    [b""],
    [msgpack.packb(GOOD) + b"\x00"],  # trailing bytes
    raw([1, 2, 3]),  # not a map
    [msgpack.packb({1: "x"})],  # non-str key
    raw({**GOOD, "op": "delete"}),
    raw({**GOOD, "op": None}),
    raw({**GOOD, "uid": ""}),
    raw({**GOOD, "uid": "x" * (MAX_UID_CHARS + 1)}),
    raw({**GOOD, "uid": b"g.0"}),
    raw({**GOOD, "root": ROOT[:31]}),
    raw({**GOOD, "root": ROOT + b"\x00"}),
    raw({**GOOD, "root": ROOT.hex()}),
    raw({k: v for k, v in GOOD.items() if k != "root"}),
    raw({k: v for k, v in GOOD.items() if k != "i"}),
    raw({**GOOD, "i": -1}),
    raw({**GOOD, "i": (1 << 30) + 1}),
    raw({**GOOD, "i": 1.0}),
    raw({**GOOD, "i": True}),
    raw({**ADOPT, "version": -1}),
    raw({**ADOPT, "version": 2**53 + 1}),
    raw({**ADOPT, "version": False}),
    raw({k: v for k, v in ADOPT.items() if k != "version"}),
    raw({**ADOPT, "timeout": 0}),
    raw({**ADOPT, "timeout": -1.0}),
    raw({**ADOPT, "timeout": MAX_ADOPT_TIMEOUT_S + 1}),
    raw({**ADOPT, "timeout": float("nan")}),
    raw({**ADOPT, "timeout": float("inf")}),
    raw({**ADOPT, "timeout": True}),
    raw({**ADOPT, "timeout": "10"}),
    raw({k: v for k, v in ADOPT.items() if k != "timeout"}),
])
def test_malformed_requests_are_bad_request(frames):
    with pytest.raises(ShardRequestError) as info:
        decode_request(frames)
    assert info.value.code == "bad_request"


def test_decode_reply():
    status, payload = decode_reply(ok_reply(b"bytes", msg="hi"))
    assert status == {"ok": True, "msg": "hi"} and payload == b"bytes"
    with pytest.raises(ShardRequestError) as info:
        decode_reply(error_reply("unknown_shard", "not here"))
    assert (info.value.code, info.value.message) == ("unknown_shard", "not here")
    # an error status without proper fields still raises, with a generic code
    with pytest.raises(ShardRequestError) as info:
        decode_reply([msgpack.packb({"ok": False, "code": 5, "msg": None}), b""])
    assert (info.value.code, info.value.message) == ("error", "")
    for garbage in ([b"\xc1", b""], [msgpack.packb([True]), b""], [msgpack.packb({"ok": 1}), b""],
                    [msgpack.packb({"ok": True})], [*ok_reply(b"x"), b"extra"]):
        with pytest.raises(ShardRequestError) as info:
            decode_reply(garbage)
        assert info.value.code == "bad_reply"


# -- ShardServer.submit ------------------------------------------------------------------


class Collector:
    """A reply callback that records frames and signals the waiting test."""

    def __init__(self) -> None:
        self.frames: list[list[bytes]] = []
        self.threads: list[str] = []
        self.event = threading.Event()

    def __call__(self, frames: list) -> None:
        self.frames.append([bytes(f) for f in frames])
        self.threads.append(threading.current_thread().name)
        self.event.set()

    def get(self, timeout: float = 10.0) -> tuple[dict, bytes]:
        assert self.event.wait(timeout), "no reply"
        assert len(self.frames) == 1, self.frames
        return decode_reply(self.frames[0])


def ask(server: ShardServer, req: ShardRequest | list) -> Collector:
    c = Collector()
    server.submit(encode_request(req) if isinstance(req, ShardRequest) else req, c)
    return c


def test_server_serves_header_and_chunks(cache, shard):
    header, body, _ = shard
    server = ShardServer(cache)
    try:
        c = ask(server, ShardRequest("header", UID, header.root))
        _, raw_header = c.get()
        assert raw_header == header.raw
        assert c.threads[0].startswith("volunteer-shard-io")  # disk work off the caller's thread
        for i in (0, header.num_chunks - 1):
            _, data = ask(server, ShardRequest("chunk", UID, header.root, index=i)).get()
            start, end = header.chunk_span(i)
            assert data == body[start:end]
        stats = server.stats.as_dict()
        assert stats["headers"] == 1 and stats["chunks"] == 2 and stats["errors"] == 0
        assert stats["bytes_out"] == len(header.raw) + header.chunk_size(0) + header.chunk_size(header.num_chunks - 1)
    finally:
        server.close()


def test_server_errors(cache, shard):
    header, _, _ = shard
    server = ShardServer(cache)
    try:
        cases = [
            (ShardRequest("header", UID, ROOT), "unknown_shard"),  # unknown root
            (ShardRequest("chunk", UID, ROOT, index=0), "unknown_shard"),
            (ShardRequest("header", "g.1", header.root), "unknown_shard"),  # uid mismatch
            (ShardRequest("chunk", UID, header.root, index=header.num_chunks), "bad_request"),
            (raw({"op": "header", "uid": UID, "root": b"short"}), "bad_request"),
            (ShardRequest("adopt", UID, header.root, version=1, timeout=5.0), "refused"),  # no adopt fn
        ]
        for req, code in cases:
            with pytest.raises(ShardRequestError) as info:
                ask(server, req).get()
            assert info.value.code == code, req
        assert server.stats.errors == 5 and server.stats.adopt_requests == 1
        # the server still serves afterwards
        assert ask(server, ShardRequest("header", UID, header.root)).get()[1] == header.raw
    finally:
        server.close()


def test_server_does_not_serve_partial_shards(tmp_path, shard):
    header, body, _ = shard
    cache = ShardCache(tmp_path / "partial", 1 << 30)
    with cache.open_partial(header) as partial:
        partial.write_chunk(0, body[: header.chunk_size(0)])
    server = ShardServer(cache)
    try:
        with pytest.raises(ShardRequestError) as info:
            ask(server, ShardRequest("chunk", UID, header.root, index=0)).get()
        assert info.value.code == "unknown_shard"
    finally:
        server.close()


def test_closed_server_answers_unavailable(cache, shard):
    header, _, _ = shard
    server = ShardServer(cache)
    server.close()
    with pytest.raises(ShardRequestError) as info:
        ask(server, ShardRequest("chunk", UID, header.root, index=0)).get()
    assert info.value.code == "unavailable"


def test_adopt_callback_and_its_answer(cache, shard):
    header, _, _ = shard
    calls = []

    def adopt(uid, version, root, timeout):
        calls.append((uid, version, root, timeout, threading.current_thread().name))
        if uid == "g.9":
            return False, "no free slot"
        if uid == "g.8":
            raise RuntimeError("disk full")
        return True, f"serving {uid} v{version}"

    server = ShardServer(cache, adopt=adopt)
    try:
        status, payload = ask(server, ShardRequest("adopt", UID, header.root, version=42, timeout=12.5)).get()
        assert status == {"ok": True, "msg": "serving g.0 v42"} and payload == b""
        assert calls[0][:4] == (UID, 42, header.root, 12.5) and calls[0][4] == "volunteer-adopt"
        with pytest.raises(ShardRequestError) as info:
            ask(server, ShardRequest("adopt", "g.9", header.root, version=1, timeout=1.0)).get()
        assert (info.value.code, info.value.message) == ("refused", "no free slot")
        with pytest.raises(ShardRequestError) as info:
            ask(server, ShardRequest("adopt", "g.8", header.root, version=1, timeout=1.0)).get()
        assert info.value.code == "internal" and "disk full" in info.value.message
        assert server.stats.adopt_requests == 3
    finally:
        server.close()


def test_adoptions_are_bounded(cache, shard):
    header, _, _ = shard
    release = threading.Event()
    started = threading.Semaphore(0)

    def adopt(uid, version, root, timeout):
        started.release()
        assert release.wait(10)
        return True, "ok"

    server = ShardServer(cache, adopt=adopt, max_adoptions=2)
    try:
        first = [ask(server, ShardRequest("adopt", f"g.{i}", header.root, version=1, timeout=5.0)) for i in range(2)]
        for _ in range(2):
            assert started.acquire(timeout=10)
        with pytest.raises(ShardRequestError) as info:
            ask(server, ShardRequest("adopt", "g.2", header.root, version=1, timeout=5.0)).get()
        assert info.value.code == "busy"
        # header and chunk requests are not held up by adoptions in progress
        assert ask(server, ShardRequest("header", UID, header.root)).get()[1] == header.raw
        release.set()
        for c in first:
            assert c.get()[0]["ok"] is True
        # the slots are given back: a new adoption is accepted
        assert ask(server, ShardRequest("adopt", "g.3", header.root, version=1, timeout=5.0)).get()[0]["ok"]
    finally:
        release.set()
        server.close()


# -- over libp2p ---------------------------------------------------------------------------


def test_download_between_two_hosts(tmp_path, cache, shard):
    header, body, state = shard
    adopted = []

    def adopt(uid, version, root, timeout):
        adopted.append((uid, version, root))
        return True, f"serving {uid}"

    server = ShardServer(cache, adopt=adopt)
    dest = ShardCache(tmp_path / "dest", 1 << 30)
    progress = DownloadProgress(uid=UID, root_hex=header.root_hex)
    holder_ids: list[str] = []

    async def main():
        async with swarm(tmp_path / "nodes", 2) as (holder, asker), trio.open_nursery() as nursery:
            RpcServer(holder.host, server.submit, REQUEST_LIMITS, protocol=SHARD_PROTOCOL_ID).install()
            rpc = RpcClient(asker.host, nursery, REPLY_LIMITS, protocol=SHARD_PROTOCOL_ID)
            client = ShardClient(rpc)
            src = Source(holder.peer_id, tuple(holder.multiaddrs()))
            holder_ids.append(holder.peer_id.to_base58())
            with trio.fail_after(30):
                got = await download_shard(client, dest, UID, FP, header.root, [src], progress)
                assert got.raw == header.raw
                with pytest.raises(ShardRequestError) as info:
                    await client.header(holder.peer_id, src.addrs, UID, ROOT, FP, 10.0)
                assert info.value.code == "unknown_shard"
                msg = await client.adopt(holder.peer_id, src.addrs, "g.5", 3, header.root, 10.0)
                assert msg == "serving g.5"
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        server.close()
    assert dest.has_complete(header.root) and dest.read_body(header.root) == body
    decoded = decode_shard(header, dest.read_body(header.root))
    for name, tensor in state["module"].items():
        assert torch.equal(decoded["module"][name], tensor)
    assert progress.state == "done" and progress.fetched_bytes == header.total_bytes
    assert progress.by_source == {holder_ids[0]: header.num_chunks}
    assert server.stats.chunks == header.num_chunks and server.stats.headers == 1
    assert adopted == [("g.5", 3, header.root)]


def test_transport_refusals_keep_their_code_and_garbage_is_bad_reply():
    from volunteer.wire.messages import encode_error

    with pytest.raises(ShardRequestError) as e:
        decode_reply(encode_error(None, "overloaded", "node holds too many requests"))
    assert e.value.code == "overloaded" and "too many" in e.value.message
    for frame in (b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"op": "error", "code": 7}),
                  b"\x00" * 10_000):
        with pytest.raises(ShardRequestError) as e:
            decode_reply([frame])
        assert e.value.code == "bad_reply"

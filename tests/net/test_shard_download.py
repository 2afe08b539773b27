"""``download_shard`` against a fake shard client: several sources, bad and flaky holders,
failure with the partial file kept, resume, and the completed shard in a real cache."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import trio

from volunteer.experts.backend import ExpertBackend
from volunteer.experts.shard import ShardHeader, decode_shard, encode_shard, parse_header
from volunteer.experts.shard_cache import ShardCache
from volunteer.net.shard_download import (
    MAX_FAILURES,
    PER_SOURCE,
    DownloadProgress,
    ShardDownloadError,
    Source,
    download_shard,
)
from volunteer.net.shard_rpc import ShardRequestError
from volunteer.wire.errors import RemoteTimeoutError, UnreachableError

UID = "g.0"
FP = "fp-test"
CHUNK = 4096

pytestmark = pytest.mark.timeout(60)

STATES: dict[bytes, dict] = {}  # root -> the state dict it was encoded from


@pytest.fixture(scope="module")
def shard() -> tuple[ShardHeader, bytes]:
    torch.manual_seed(0)
    state = ExpertBackend(UID, "ffn", 64).state_dict()
    header, body = encode_shard(UID, FP, state, chunk_bytes=CHUNK)
    STATES[header.root] = state
    assert header.num_chunks >= 16  # many chunks, so they can spread over sources
    return header, body


def chunk_of(header: ShardHeader, body: bytes, i: int) -> bytes:
    start, end = header.chunk_span(i)
    return body[start:end]


class Peer:
    """How one fake holder answers.

    ``header``: "ok" | "garbage" | "other" (a valid header of another root) | "down";
    ``chunks``: "ok" | "corrupt" | "down"; ``fail_calls``: chunk call numbers (0-based, per
    peer) that raise ``error``; ``down_after``: chunk calls from that number on raise ``error``.
    """

    def __init__(self, header: str = "ok", chunks: str = "ok", fail_calls: frozenset[int] = frozenset(),
                 down_after: int | None = None, error: Exception | None = None) -> None:
        self.header = header
        self.chunks = chunks
        self.fail_calls = fail_calls
        self.down_after = down_after
        self.error = error or UnreachableError("peer unreachable")
        self.header_calls = 0
        self.chunk_calls: list[int] = []
        self.failures = 0
        self.delivered = 0


class FakeClient:
    """Async ``header`` / ``chunk`` like ``ShardClient``; the header is parsed exactly as it does."""

    def __init__(self, header: ShardHeader, body: bytes, peers: dict[str, Peer],
                 other_header: ShardHeader | None = None) -> None:
        self.h = header
        self.body = body
        self.peers = peers
        self.other = other_header

    async def header(self, peer_id, addrs, uid, root, fingerprint, timeout):
        peer = self.peers[peer_id]
        peer.header_calls += 1
        await trio.sleep(0)
        if peer.header == "down":
            raise UnreachableError(f"{peer_id} is unreachable")
        raw = {"ok": self.h.raw, "garbage": b"\x93not a header",
               "other": self.other.raw if self.other else b""}[peer.header]
        return parse_header(raw, root=root, uid=uid, fingerprint=fingerprint)

    async def chunk(self, peer_id, addrs, uid, root, index, timeout):
        peer = self.peers[peer_id]
        n = len(peer.chunk_calls)
        peer.chunk_calls.append(index)
        await trio.sleep(0)
        if peer.chunks == "down" or n in peer.fail_calls or (peer.down_after is not None and n >= peer.down_after):
            peer.failures += 1
            raise peer.error
        data = chunk_of(self.h, self.body, index)
        if peer.chunks == "corrupt":
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        else:
            peer.delivered += 1
        return data


def run_download(client, cache, header, sources, progress=None, on_chunk=None):
    progress = progress or DownloadProgress(uid=UID, root_hex=header.root_hex)

    async def main():
        return await download_shard(client, cache, UID, FP, header.root, sources, progress, on_chunk)

    return trio.run(main), progress


def assert_complete(cache: ShardCache, header: ShardHeader, body: bytes, progress: DownloadProgress) -> None:
    assert cache.has_complete(header.root)
    got = cache.read_body(header.root)
    assert got == body
    want = STATES[header.root]
    state = decode_shard(header, got)
    assert set(state["module"]) == set(want["module"])
    for name, tensor in want["module"].items():
        assert torch.equal(state["module"][name], tensor), name
    assert state["updates_applied"] == want["updates_applied"]
    assert progress.state == "done" and progress.error is None and progress.finished_at is not None
    assert progress.have_bytes == progress.total_bytes == header.total_bytes
    assert progress.chunks_done == progress.chunks_total == header.num_chunks
    assert progress.version == header.version


def test_two_honest_sources_share_the_chunks(tmp_path, shard):
    header, body = shard
    cache = ShardCache(tmp_path / "cache", 1 << 30)
    peers = {"peer-a": Peer(), "peer-b": Peer()}
    client = FakeClient(header, body, peers)
    seen: list[int] = []
    got, progress = run_download(client, cache, header, [Source("peer-a"), Source("peer-b")],
                                 on_chunk=lambda p: seen.append(p.chunks_done))
    assert got.root == header.root and got.raw == header.raw
    assert_complete(cache, header, body, progress)
    assert peers["peer-a"].delivered > 0 and peers["peer-b"].delivered > 0
    assert progress.by_source == {"peer-a": peers["peer-a"].delivered, "peer-b": peers["peer-b"].delivered}
    assert sum(progress.by_source.values()) == header.num_chunks
    # every chunk asked exactly once: nothing travelled twice
    asked = Counter(peers["peer-a"].chunk_calls + peers["peer-b"].chunk_calls)
    assert set(asked) == set(range(header.num_chunks)) and set(asked.values()) == {1}
    assert progress.fetched_bytes == header.total_bytes and progress.resumed_bytes == 0
    assert progress.bad_sources == [] and progress.failed_sources == {}
    assert seen == list(range(1, header.num_chunks + 1))  # on_chunk after every verified chunk
    d = progress.as_dict()
    assert d["fraction"] == 1.0 and d["state"] == "done" and d["sources"] == progress.by_source
    # only one header request was needed
    assert peers["peer-a"].header_calls + peers["peer-b"].header_calls == 1


def test_corrupting_source_is_dropped_and_honest_one_finishes(tmp_path, shard):
    header, body = shard
    cache = ShardCache(tmp_path / "cache", 1 << 30)
    peers = {"peer-bad": Peer(chunks="corrupt"), "peer-good": Peer()}
    client = FakeClient(header, body, peers)
    _, progress = run_download(client, cache, header, [Source("peer-bad"), Source("peer-good")])
    assert_complete(cache, header, body, progress)
    assert progress.bad_sources == ["peer-bad"]
    assert 1 <= len(peers["peer-bad"].chunk_calls) <= PER_SOURCE
    assert "peer-bad" not in progress.by_source
    assert progress.by_source == {"peer-good": header.num_chunks}
    # the corrupt bytes travelled too, and are counted
    bad_bytes = sum(header.chunk_size(i) for i in peers["peer-bad"].chunk_calls)
    assert progress.fetched_bytes == header.total_bytes + bad_bytes


@pytest.mark.parametrize("mode", ["garbage", "other"])
def test_source_with_a_wrong_header_is_marked_bad(tmp_path, shard, mode):
    header, body = shard
    torch.manual_seed(1)
    other, _ = encode_shard(UID, FP, ExpertBackend(UID, "ffn", 64).state_dict(), chunk_bytes=CHUNK)
    assert other.root != header.root
    cache = ShardCache(tmp_path / "cache", 1 << 30)
    peers = {"peer-liar": Peer(header=mode), "peer-good": Peer()}
    client = FakeClient(header, body, peers, other_header=other)
    _, progress = run_download(client, cache, header, [Source("peer-liar"), Source("peer-good")])
    assert_complete(cache, header, body, progress)
    assert progress.bad_sources == ["peer-liar"]
    assert peers["peer-liar"].header_calls == 1 and peers["peer-good"].header_calls == 1
    assert peers["peer-liar"].chunk_calls == []  # never asked for a chunk after a bad header
    assert progress.by_source == {"peer-good": header.num_chunks}


def test_unreachable_header_source_is_skipped_but_kept_for_chunks(tmp_path, shard):
    header, body = shard
    cache = ShardCache(tmp_path / "cache", 1 << 30)
    peers = {"peer-a": Peer(header="down"), "peer-b": Peer()}
    client = FakeClient(header, body, peers)
    _, progress = run_download(client, cache, header, [Source("peer-a"), Source("peer-b")])
    assert_complete(cache, header, body, progress)
    assert progress.bad_sources == []
    assert "peer-a" in progress.failed_sources
    assert peers["peer-a"].delivered > 0  # a failed header call is no reason to skip its chunks


def test_header_of_another_uid_under_the_root_fails_every_source(tmp_path, shard):
    header, body = shard
    cache = ShardCache(tmp_path / "cache", 1 << 30)
    peers = {"peer-a": Peer(), "peer-b": Peer()}
    client = FakeClient(header, body, peers)
    progress = DownloadProgress(uid="g.1", root_hex=header.root_hex)

    async def main():
        await download_shard(client, cache, "g.1", FP, header.root, [Source("peer-a"), Source("peer-b")], progress)

    with pytest.raises(ShardDownloadError, match=r"no holder gave the header of g\.1"):
        trio.run(main)
    assert sorted(progress.bad_sources) == ["peer-a", "peer-b"]
    assert not cache.has_complete(header.root) and cache.header(header.root) is None


@pytest.mark.parametrize("error", [UnreachableError("gone"), RemoteTimeoutError("slow"),
                                   ShardRequestError("unknown_shard", "evicted"), OSError("reset")],
                         ids=lambda e: type(e).__name__)
def test_flaky_source_is_retried_then_dropped(tmp_path, shard, error):
    header, body = shard
    cache = ShardCache(tmp_path / "cache", 1 << 30)
    odd = frozenset(range(1, 1000, 2))
    peers = {"peer-flaky": Peer(fail_calls=odd, error=error), "peer-good": Peer()}
    client = FakeClient(header, body, peers)
    _, progress = run_download(client, cache, header, [Source("peer-flaky"), Source("peer-good")])
    assert_complete(cache, header, body, progress)
    flaky = peers["peer-flaky"]
    assert flaky.delivered > 0 and progress.by_source["peer-flaky"] == flaky.delivered
    # dropped after MAX_FAILURES (calls already in flight on its other workers may fail too)
    assert MAX_FAILURES <= flaky.failures <= MAX_FAILURES + PER_SOURCE - 1
    assert len(flaky.chunk_calls) < header.num_chunks // 2
    assert "peer-flaky" in progress.failed_sources and progress.bad_sources == []
    assert progress.by_source["peer-good"] + flaky.delivered == header.num_chunks


def test_lone_source_that_fails_a_few_times_is_retried(tmp_path, shard):
    header, body = shard
    cache = ShardCache(tmp_path / "cache", 1 << 30)
    peers = {"peer-a": Peer(fail_calls=frozenset(range(MAX_FAILURES - 1)))}
    client = FakeClient(header, body, peers)
    _, progress = run_download(client, cache, header, [Source("peer-a")])
    assert_complete(cache, header, body, progress)
    assert peers["peer-a"].failures == MAX_FAILURES - 1
    assert progress.by_source == {"peer-a": header.num_chunks}
    # the failed chunks were asked again
    assert len(peers["peer-a"].chunk_calls) == header.num_chunks + MAX_FAILURES - 1


def test_all_sources_failing_raises_and_keeps_the_partial_file(tmp_path, shard):
    header, body = shard
    cache = ShardCache(tmp_path / "cache", 1 << 30)
    delivered_first = 5
    peers = {"peer-a": Peer(down_after=delivered_first), "peer-b": Peer(chunks="down")}
    client = FakeClient(header, body, peers)
    progress = DownloadProgress(uid=UID, root_hex=header.root_hex)
    with pytest.raises(ShardDownloadError, match=r"every holder of g\.0 failed"):
        run_download(client, cache, header, [Source("peer-a"), Source("peer-b")], progress)
    assert progress.state == "failed" and progress.error and progress.finished_at is not None
    assert peers["peer-a"].delivered == delivered_first
    assert progress.chunks_done == delivered_first
    for p in peers.values():
        assert MAX_FAILURES <= p.failures <= MAX_FAILURES + PER_SOURCE - 1
    assert set(progress.failed_sources) == {"peer-a", "peer-b"}
    assert not cache.has_complete(header.root)
    # the verified chunks stay on disk: a new try starts from them
    with cache.open_partial(header) as partial:
        assert len(partial.have) == delivered_first
        assert partial.bytes_present == progress.have_bytes
        written = set(partial.have)
    # ...and a later download with a working holder fetches only the rest
    peers2 = {"peer-c": Peer()}
    _, progress2 = run_download(FakeClient(header, body, peers2), cache, header, [Source("peer-c")])
    assert_complete(cache, header, body, progress2)
    assert set(peers2["peer-c"].chunk_calls) == set(range(header.num_chunks)) - written


def test_no_sources_raise_at_once(tmp_path, shard):
    header, body = shard
    cache = ShardCache(tmp_path / "cache", 1 << 30)
    peers = {"peer-a": Peer()}
    client = FakeClient(header, body, peers)
    with pytest.raises(ShardDownloadError, match="no holder"):
        run_download(client, cache, header, [])
    progress = DownloadProgress(uid=UID, root_hex=header.root_hex, bad_sources=["peer-a"])
    with pytest.raises(ShardDownloadError, match="no holder"):
        run_download(client, cache, header, [Source("peer-a")], progress)
    assert peers["peer-a"].header_calls == 0  # a known-bad holder is not asked again


def test_resume_fetches_only_missing_chunks(tmp_path, shard):
    header, body = shard
    cache = ShardCache(tmp_path / "cache", 1 << 30)
    pre = list(range(0, header.num_chunks, 2))  # every other chunk is already on disk
    with cache.open_partial(header) as partial:
        for i in pre:
            partial.write_chunk(i, chunk_of(header, body, i))
    peers = {"peer-a": Peer(), "peer-b": Peer()}
    client = FakeClient(header, body, peers)
    _, progress = run_download(client, cache, header, [Source("peer-a"), Source("peer-b")])
    assert_complete(cache, header, body, progress)
    asked = Counter(peers["peer-a"].chunk_calls + peers["peer-b"].chunk_calls)
    missing = set(range(header.num_chunks)) - set(pre)
    assert set(asked) == missing and set(asked.values()) == {1}
    resumed = sum(header.chunk_size(i) for i in pre)
    assert progress.resumed_bytes == resumed > 0
    assert progress.fetched_bytes == header.total_bytes - resumed
    assert sum(progress.by_source.values()) == len(missing)


def test_already_complete_shard_fetches_no_chunk(tmp_path, shard):
    header, body = shard
    cache = ShardCache(tmp_path / "cache", 1 << 30)
    cache.put_complete(header, body)
    peers = {"peer-a": Peer()}
    _, progress = run_download(FakeClient(header, body, peers), cache, header, [Source("peer-a")])
    assert_complete(cache, header, body, progress)
    assert peers["peer-a"].chunk_calls == []
    assert progress.resumed_bytes == header.total_bytes and progress.fetched_bytes == 0


def test_a_local_disk_error_ends_the_download_without_blaming_a_holder(tmp_path, shard, monkeypatch):
    from volunteer.experts.shard_cache import PartialShard
    from volunteer.net.shard_download import ShardDownloadError

    header, body = shard
    cache = ShardCache(tmp_path / "cache", 1 << 30)
    peers = {"peer-a": Peer(), "peer-b": Peer()}

    def full_disk(self, i, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PartialShard, "write_chunk", full_disk)
    progress = DownloadProgress(uid=UID, root_hex=header.root_hex)
    with pytest.raises(ShardDownloadError, match="No space left on device"):
        run_download(FakeClient(header, body, peers), cache, header, [Source("peer-a"), Source("peer-b")], progress)
    assert progress.state == "failed" and progress.bad_sources == [] and progress.failed_sources == {}

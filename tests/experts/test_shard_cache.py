"""The on-disk shard cache: atomic complete shards, resumable verified downloads, LRU eviction."""

from __future__ import annotations

import dataclasses
import os
import stat
import threading
from pathlib import Path

import pytest
import torch

from volunteer.experts.shard import ShardFormatError, ShardHashError, ShardHeader, encode_shard
from volunteer.experts.shard_cache import IncompleteShardError, ShardCache

CHUNK = 4096


def make_shard(seed: int = 0, nbytes: int = 5 * CHUNK + 100) -> tuple[ShardHeader, bytes]:
    g = torch.Generator().manual_seed(seed)
    state = {"module": {"w": torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8)}, "updates_applied": seed}
    return encode_shard(f"t.ffn.0.{seed}", "fp", state, CHUNK)


def chunk(header: ShardHeader, body: bytes, i: int) -> bytes:
    start, end = header.chunk_span(i)
    return body[start:end]


def test_put_complete_then_read(tmp_path: Path) -> None:
    cache = ShardCache(tmp_path / "shards", max_bytes=1 << 30)
    header, body = make_shard()
    assert not cache.has_complete(header.root) and cache.header(header.root) is None
    with pytest.raises(KeyError):
        cache.read_chunk(header.root, 0)
    cache.put_complete(header, body)
    cache.put_complete(header, body)  # idempotent
    assert cache.has_complete(header.root) and cache.roots() == [header.root]
    d = tmp_path / "shards" / header.root_hex
    assert sorted(p.name for p in d.iterdir()) == ["body", "header"]  # no temp files left
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert cache.read_body(header.root) == body
    assert b"".join(cache.read_chunk(header.root, i) for i in range(header.num_chunks)) == body
    with pytest.raises(ShardFormatError):
        cache.read_chunk(header.root, header.num_chunks)
    fresh = ShardCache(tmp_path / "shards", max_bytes=1 << 30)  # re-parsed from disk
    assert fresh.header(header.root) == header
    assert cache.total_bytes() == len(body) + len(header.raw)
    other, other_body = make_shard(1)
    with pytest.raises(ShardHashError):  # a body that does not match its header is refused
        cache.put_complete(other, other_body[:-1] + bytes([other_body[-1] ^ 1]))
    cache.remove(header.root)
    assert not cache.has_complete(header.root) and cache.roots() == []


def test_corrupt_header_or_body_on_disk_is_dropped(tmp_path: Path) -> None:
    header, body = make_shard()
    cache = ShardCache(tmp_path, max_bytes=1 << 30)
    cache.put_complete(header, body)
    (tmp_path / header.root_hex / "header").write_bytes(header.raw[:-1])
    fresh = ShardCache(tmp_path, max_bytes=1 << 30)
    assert fresh.header(header.root) is None and not (tmp_path / header.root_hex).exists()
    cache = ShardCache(tmp_path, max_bytes=1 << 30)
    cache.put_complete(header, body)
    with open(tmp_path / header.root_hex / "body", "r+b") as fh:
        fh.seek(CHUNK + 3)
        fh.write(b"\xff\x00")
    assert cache.read_chunk(header.root, 0) == chunk(header, body, 0)
    with pytest.raises(ShardHashError):
        cache.read_chunk(header.root, 1)
    assert not cache.has_complete(header.root)


def test_partial_download_resumes_after_a_crash(tmp_path: Path) -> None:
    header, body = make_shard()
    cache = ShardCache(tmp_path, max_bytes=1 << 30)
    part = cache.open_partial(header)
    assert part.missing() == list(range(header.num_chunks)) and part.bytes_present == 0
    for i in (0, 2, 5):
        part.write_chunk(i, chunk(header, body, i))
    assert part.have == {0, 2, 5} and part.bytes_present == 2 * CHUNK + 100
    assert not cache.has_complete(header.root) and cache.roots() == []
    d = tmp_path / header.root_hex
    assert (d / "body.part").stat().st_size == header.total_bytes
    del part  # "kill -9": nothing closed or finished; then a chunk half-written at the crash
    with open(d / "body.part", "r+b") as fh:
        fh.seek(2 * CHUNK + 10)
        fh.write(b"garbage")
    part = ShardCache(tmp_path, max_bytes=1 << 30).open_partial(header)
    assert part.have == {0, 5} and part.missing() == [1, 2, 3, 4]
    with pytest.raises(IncompleteShardError, match="misses 4 chunks"):
        part.finish()
    threads = [threading.Thread(target=part.write_chunk, args=(i, chunk(header, body, i))) for i in part.missing()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert part.missing() == [] and part.bytes_present == header.total_bytes
    part.finish()
    assert cache.has_complete(header.root) and cache.read_body(header.root) == body
    assert sorted(p.name for p in d.iterdir()) == ["body", "header"]
    again = cache.open_partial(header)  # already complete: nothing to fetch
    assert again.missing() == [] and cache.read_body(header.root) == body


def test_write_chunk_rejects_a_bad_chunk_and_writes_nothing(tmp_path: Path) -> None:
    header, body = make_shard()
    cache = ShardCache(tmp_path, max_bytes=1 << 30)
    with cache.open_partial(header) as part:
        good = chunk(header, body, 1)
        bad = bytes([good[0] ^ 1]) + good[1:]
        with pytest.raises(ShardHashError) as err:
            part.write_chunk(1, bad)
        assert err.value.chunk == 1
        with pytest.raises(ShardFormatError):
            part.write_chunk(1, good[:-1])
        with pytest.raises(ShardFormatError):
            part.write_chunk(header.num_chunks, good)
        assert part.have == set()
        raw = (tmp_path / header.root_hex / "body.part").read_bytes()
        assert raw == bytes(header.total_bytes)
    with pytest.raises(ValueError, match="closed"):
        part.write_chunk(1, good)


def test_empty_shard_download(tmp_path: Path) -> None:
    header, body = encode_shard("e", "fp", {"updates_applied": 0}, CHUNK)
    cache = ShardCache(tmp_path, max_bytes=1 << 30)
    part = cache.open_partial(header)
    assert part.missing() == [] and header.num_chunks == 0
    part.finish()
    assert cache.has_complete(header.root) and cache.read_body(header.root) == body == b""


def test_lru_eviction_respects_pins_and_max_bytes(tmp_path: Path) -> None:
    shards = [make_shard(seed) for seed in range(4)]
    size = shards[0][0].total_bytes + len(shards[0][0].raw)
    cache = ShardCache(tmp_path, max_bytes=2 * size + 10)
    for header, body in shards[:3]:
        cache.put_complete(header, body)
    partial = cache.open_partial(shards[3][0])  # a download in progress counts its full size
    partial.write_chunk(0, chunk(shards[3][0], shards[3][1], 0))
    partial.close()
    roots = [h.root for h, _ in shards]
    for age, root in enumerate(roots):  # shard 0 is the least recently used
        os.utime(tmp_path / root.hex(), (1000 + age, 1000 + age))
    cache.touch(roots[1])  # now the most recent
    assert cache.total_bytes() >= 4 * size
    freed = cache.evict(pinned=[roots[0]])
    assert cache.total_bytes() <= cache.max_bytes and freed >= 2 * size
    # LRU order 0 (pinned), 2, 3, 1: 2 and 3 go, the pinned one and the recent one stay
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([roots[0].hex(), roots[1].hex()])
    assert cache.evict(pinned=[roots[0]]) == 0
    cache.max_bytes = size
    assert cache.evict() > 0 and cache.roots() == [roots[1]]


def test_foreign_directory_entries_are_ignored_and_removed(tmp_path: Path) -> None:
    header, body = make_shard()
    cache = ShardCache(tmp_path, max_bytes=1 << 30)
    cache.put_complete(header, body)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ("A" * 64)).mkdir()  # upper-case hex is not a name we make
    (tmp_path / "0").mkdir()
    (tmp_path / ("ab" * 32)).write_text("a file, not a shard directory")
    assert cache.roots() == [header.root]
    assert sorted(p.name for p in tmp_path.iterdir()) == [header.root_hex]
    for bad_root in (b"../escape", b"\0" * 31, "ab" * 32):  # e.g. from a peer: never a path, just absent
        assert not cache.has_complete(bad_root) and cache.header(bad_root) is None  # type: ignore[arg-type]
        with pytest.raises(KeyError):
            cache.read_chunk(bad_root, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        cache.open_partial(dataclasses.replace(header, root=b"../x"))

"""The node's on-disk shard cache: shards it made (to serve) and downloads in progress.

Layout, every name derived from the root hex only (never from a peer-supplied string)::

    <directory>/<root_hex>/header      the raw header (sha256(header) == root)
    <directory>/<root_hex>/body        a complete shard's body
    <directory>/<root_hex>/body.part   a download in progress: pre-sized (sparse), chunks
                                       written in place at their offsets with os.pwrite

- ``put_complete`` writes header and body atomically (``volunteer.fsutil.atomic_write``), so
  a crash leaves no torn ``body``; a shard is complete exactly when ``body`` exists.
- A download survives a restart or ``kill -9``: ``open_partial`` on an existing ``body.part``
  hashes every chunk region and counts only the chunks that match their hash as present, so a
  chunk half-written at the crash is simply fetched again. ``PartialShard.write_chunk``
  verifies before writing and may be called from several threads for different chunks.
- ``touch`` (on every use) sets the shard directory's mtime; ``evict`` removes the least
  recently used unpinned shards (complete or partial) until the cache fits ``max_bytes``.
  Sizes count the full length of ``body.part`` (the space a download will need). Pin the
  roots of downloads in progress and shards being served.
- Top-level entries that are not 64 lowercase hex characters are not ours: they are removed.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Collection
from pathlib import Path

from volunteer.experts.shard import (
    ShardError,
    ShardFormatError,
    ShardHeader,
    parse_header,
    verify_chunk,
)
from volunteer.fsutil import atomic_write_bytes, fsync_dir

_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_READ = 1 << 20  # read size when hashing chunk regions


class IncompleteShardError(ShardError):
    """``finish`` of a download that still misses chunks."""


def _root_hex(root: bytes) -> str:
    if type(root) is not bytes or len(root) != 32:
        raise ValueError(f"a shard root is 32 bytes, got {root!r:.80}")
    return root.hex()


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    parts = []
    while size > 0:
        data = os.pread(fd, min(size, 64 << 20), offset)
        if not data:
            break
        parts.append(data)
        size -= len(data)
        offset += len(data)
    return b"".join(parts)


class PartialShard:
    """A download in progress: chunks are verified, then written in place."""

    def __init__(self, cache: ShardCache, header: ShardHeader, directory: Path, fd: int | None, have: set[int]):
        self.header = header
        self.have = have
        self._cache = cache
        self._dir = directory
        self._fd = fd  # None once finished/closed or when the shard was already complete
        self._writers = 0  # pwrites in flight: the fd is closed only when none is
        self._cond = threading.Condition()

    def missing(self) -> list[int]:
        with self._cond:
            return [i for i in range(self.header.num_chunks) if i not in self.have]

    @property
    def bytes_present(self) -> int:
        with self._cond:
            return sum(self.header.chunk_size(i) for i in self.have)

    def write_chunk(self, i: int, data: bytes | memoryview) -> None:
        """Verify chunk ``i`` (ShardHashError/ShardFormatError: nothing written), then store it."""
        verify_chunk(self.header, i, data)
        with self._cond:
            if i in self.have:
                return
            if self._fd is None:
                raise ValueError(f"partial shard {self.header.root_hex} is closed")
            fd = self._fd
            self._writers += 1
        try:  # outside the lock: writers of different chunks run in parallel
            _pwrite_all(fd, data, self.header.chunk_span(i)[0])
            with self._cond:
                self.have.add(i)
        finally:
            with self._cond:
                self._writers -= 1
                self._cond.notify_all()

    def _take_fd(self) -> int | None:
        """Detach the fd once no write is in flight (later writes see a closed shard)."""
        with self._cond:
            fd, self._fd = self._fd, None
            self._cond.wait_for(lambda: self._writers == 0)
        return fd

    def finish(self) -> None:
        """fsync and rename ``body.part`` to ``body``: the shard is complete and servable."""
        with self._cond:
            missing = self.header.num_chunks - len(self.have)
            if missing:
                raise IncompleteShardError(f"shard {self.header.root_hex} still misses {missing} chunks")
        fd = self._take_fd()
        if fd is None:
            if not self._cache.has_complete(self.header.root):
                raise ValueError(f"partial shard {self.header.root_hex} is closed")
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(self._dir / "body.part", self._dir / "body")
        except FileNotFoundError:  # put_complete of the same shard won the race, or it was evicted
            if not self._cache.has_complete(self.header.root):
                raise
        fsync_dir(self._dir)
        self._cache.touch(self.header.root)

    def close(self) -> None:
        """Release the file (the part stays on disk, to be resumed by ``open_partial``)."""
        fd = self._take_fd()
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> PartialShard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardCache:
    """Shards on disk under ``directory``, bounded by ``max_bytes`` through ``evict``."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._headers: dict[bytes, ShardHeader] = {}
        self._lock = threading.Lock()

    def _dir(self, root: bytes) -> Path:
        return self.directory / _root_hex(root)

    # -- complete shards --

    def put_complete(self, header: ShardHeader, body: bytes, *, verify: bool = True) -> None:
        """Store a complete shard atomically (idempotent); ``verify`` checks every chunk first."""
        if self.has_complete(header.root):
            self.touch(header.root)
            return
        if len(body) != header.total_bytes:
            raise ShardFormatError(f"body has {len(body)} bytes, header says {header.total_bytes}")
        if verify:
            view = memoryview(body)
            for i in range(header.num_chunks):
                start, end = header.chunk_span(i)
                verify_chunk(header, i, view[start:end])
        d = self._dir(header.root)
        d.mkdir(mode=0o700, exist_ok=True)
        atomic_write_bytes(d / "header", header.raw)
        atomic_write_bytes(d / "body", body)
        (d / "body.part").unlink(missing_ok=True)
        with self._lock:
            self._headers[header.root] = header

    def has_complete(self, root: bytes) -> bool:
        """Whether a complete shard ``root`` is here (False for a malformed root, e.g. from a peer)."""
        if type(root) is not bytes or len(root) != 32:
            return False
        d = self._dir(root)
        return (d / "body").is_file() and (d / "header").is_file()

    def header(self, root: bytes) -> ShardHeader | None:
        """The parsed header of a cached shard (complete or partial); a corrupt one is removed."""
        if type(root) is not bytes or len(root) != 32:
            return None
        with self._lock:
            cached = self._headers.get(root)
        if cached is not None and (self._dir(root) / "header").is_file():
            self.touch(root)
            return cached
        try:
            raw = (self._dir(root) / "header").read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            header = parse_header(raw, root=root)
        except ShardError:
            self.remove(root)
            return None
        with self._lock:
            self._headers[root] = header
        self.touch(root)
        return header

    def read_chunk(self, root: bytes, i: int) -> bytes:
        """Chunk ``i`` of a complete shard, verified against its hash; KeyError when absent.

        A chunk that no longer matches (the file rotted or was edited) removes the shard and
        raises ShardHashError.
        """
        header = self.header(root) if self.has_complete(root) else None
        if header is None:
            raise KeyError(root)
        start, end = header.chunk_span(i)
        try:
            fd = os.open(self._dir(root) / "body", os.O_RDONLY)
        except FileNotFoundError:
            raise KeyError(root) from None
        try:
            data = _pread_all(fd, end - start, start)
        finally:
            os.close(fd)
        try:
            verify_chunk(header, i, data)
        except ShardError:
            self.remove(root)
            raise
        return data

    def read_body(self, root: bytes) -> bytes:
        """The whole body of a complete shard (not verified: ``decode_shard`` does); KeyError when absent."""
        header = self.header(root) if self.has_complete(root) else None
        if header is None:
            raise KeyError(root)
        try:
            body = (self._dir(root) / "body").read_bytes()
        except FileNotFoundError:
            raise KeyError(root) from None
        if len(body) != header.total_bytes:
            self.remove(root)
            raise KeyError(root)
        return body

    # -- downloads --

    def open_partial(self, header: ShardHeader) -> PartialShard:
        """Start or resume the download of ``header``'s shard (only chunks matching their hash count)."""
        root, n = header.root, header.num_chunks
        d = self._dir(root)
        if self.has_complete(root):
            self.touch(root)
            return PartialShard(self, header, d, None, set(range(n)))
        d.mkdir(mode=0o700, exist_ok=True)
        for stale in d.glob(".*.tmp"):  # temp files of an atomic write cut short by a crash
            stale.unlink(missing_ok=True)
        hp = d / "header"
        if not hp.is_file() or hp.read_bytes() != header.raw:
            atomic_write_bytes(hp, header.raw)
        with self._lock:
            self._headers[root] = header
        part = d / "body.part"
        resumed = part.is_file()
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            have: set[int] = set()
            if resumed:
                for i in range(n):
                    start, end = header.chunk_span(i)
                    try:
                        verify_chunk(header, i, _pread_all(fd, end - start, start))
                        have.add(i)
                    except ShardError:
                        pass
            if os.fstat(fd).st_size != header.total_bytes:
                os.ftruncate(fd, header.total_bytes)
        except BaseException:
            os.close(fd)
            raise
        self.touch(root)
        return PartialShard(self, header, d, fd, have)

    # -- bookkeeping --

    def touch(self, root: bytes) -> None:
        """Mark a shard as just used (directory mtime), for LRU eviction."""
        try:
            os.utime(self._dir(root))
        except FileNotFoundError:
            pass

    def remove(self, root: bytes) -> None:
        with self._lock:
            self._headers.pop(root, None)
        shutil.rmtree(self._dir(root), ignore_errors=True)

    def _entries(self) -> list[tuple[float, str, int]]:
        """(mtime, hex, bytes) of every shard directory; foreign entries are removed."""
        out = []
        for entry in os.scandir(self.directory):
            if not _HEX_RE.match(entry.name) or not entry.is_dir(follow_symlinks=False):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    Path(entry.path).unlink(missing_ok=True)
                continue
            try:
                size = sum(f.stat(follow_symlinks=False).st_size for f in os.scandir(entry.path))
                out.append((entry.stat(follow_symlinks=False).st_mtime, entry.name, size))
            except FileNotFoundError:  # removed meanwhile
                continue
        return out

    def roots(self) -> list[bytes]:
        """Roots of the complete shards, sorted."""
        roots = [bytes.fromhex(h) for _, h, _ in self._entries()]
        return sorted(r for r in roots if self.has_complete(r))

    def total_bytes(self) -> int:
        return sum(size for _, _, size in self._entries())

    def evict(self, pinned: Collection[bytes] = ()) -> int:
        """Remove least-recently-used unpinned shards until the cache fits ``max_bytes``; bytes freed."""
        keep = {_root_hex(r) for r in pinned}
        entries = sorted(self._entries())
        total = sum(size for _, _, size in entries)
        freed = 0
        for _, hexname, size in entries:
            if total <= self.max_bytes:
                break
            if hexname in keep:
                continue
            self.remove(bytes.fromhex(hexname))
            total -= size
            freed += size
        return freed

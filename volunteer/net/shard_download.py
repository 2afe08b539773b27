"""Download one expert shard from every holder that has it at once, verified chunk by chunk.

``download_shard(client, cache, uid, fingerprint, root, sources, progress)`` (trio):

1. the header comes from the first source that answers; it must hash to ``root`` (which the
   caller read from signed DHT records) and name the expected uid and fingerprint;
2. ``cache.open_partial(header)`` resumes what an earlier try left on disk (after a restart
   or ``kill -9``: chunks already there are re-hashed and kept, so only missing bytes travel);
3. every source runs ``PER_SOURCE`` workers that take the next missing chunk from one shared
   queue, so chunks spread over the holders by how fast each answers;
4. each chunk is verified against the header before it is written (hashing and writing run
   in worker threads, not in the event loop); a holder that sends a bad chunk is dropped for
   this shard (``progress.bad_sources``) and the chunk goes back to the queue for another;
   a holder that fails ``MAX_FAILURES`` times (unreachable, timeout, "unknown shard") is
   dropped too; a chunk this node cannot write (disk full) ends the download at once and
   blames no holder;
5. ``finish()`` makes the shard complete in the cache; the header is returned.

With ``traffic`` (``volunteer.net.rate_limit.Traffic``) each chunk is paid for in the download
bucket before it is asked for, so all workers together keep to the cap.

When every source is gone before the last chunk, ``ShardDownloadError`` says why and the
partial file stays for the next try. ``progress`` (a ``DownloadProgress``) is updated in
place for ``volunteer status`` and progress bars; its numbers are plain ints (read from other
threads without locks: a torn read only shows a slightly old figure).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from volunteer.experts.shard import ShardError, ShardHashError, ShardHeader
from volunteer.net.rate_limit import Traffic
from volunteer.net.shard_rpc import ShardRequestError
from volunteer.wire.errors import RemoteError

log = logging.getLogger(__name__)

PER_SOURCE = 2
MAX_FAILURES = 3
CHUNK_TIMEOUT_S = 60.0
HEADER_TIMEOUT_S = 20.0


class ShardDownloadError(Exception):
    """No source could deliver the whole shard; ``str(err)`` is one line."""


@dataclass(frozen=True)
class Source:
    """A holder announcing the wanted root: its peer id and addresses from its record."""

    peer_id: Any
    addrs: tuple[str, ...] = ()
    zmq: str | None = None  # its ZeroMQ endpoint, when its record says it is publicly reachable

    @property
    def name(self) -> str:
        pid = self.peer_id
        return pid if isinstance(pid, str) else pid.to_base58()


@dataclass
class DownloadProgress:
    """Live figures of one download (see module docstring)."""

    uid: str
    root_hex: str
    version: int = 0
    state: str = "starting"  # starting | downloading | verifying | done | failed
    total_bytes: int = 0
    have_bytes: int = 0  # on disk and verified, resumed chunks included
    resumed_bytes: int = 0
    fetched_bytes: int = 0  # bytes that travelled in this try (verified or not)
    chunks_total: int = 0
    chunks_done: int = 0
    by_source: dict[str, int] = field(default_factory=dict)  # peer id -> chunks delivered
    bad_sources: list[str] = field(default_factory=list)
    failed_sources: dict[str, str] = field(default_factory=dict)
    via: dict[str, str] = field(default_factory=dict)  # peer id -> "zmq" | "libp2p" (last chunk's path)
    started_at: float = field(default_factory=time.time)
    transfer_started_at: float | None = None  # header in hand: chunks start to move
    finished_at: float | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        end = self.finished_at or time.time()
        elapsed = end - self.started_at
        transfer = end - self.transfer_started_at if self.transfer_started_at is not None else 0.0
        return {
            "uid": self.uid, "root": self.root_hex[:16], "version": self.version, "state": self.state,
            "total_bytes": self.total_bytes, "have_bytes": self.have_bytes,
            "resumed_bytes": self.resumed_bytes, "fetched_bytes": self.fetched_bytes,
            "chunks_total": self.chunks_total, "chunks_done": self.chunks_done,
            "fraction": round(self.have_bytes / self.total_bytes, 4) if self.total_bytes else 0.0,
            "sources": dict(self.by_source), "via": dict(self.via), "bad_sources": list(self.bad_sources),
            "failed_sources": dict(self.failed_sources), "elapsed_s": round(elapsed, 3),
            # connecting (a relayed peer: a hole punch is awaited) and the header, before any chunk
            "setup_s": round((self.transfer_started_at or end) - self.started_at, 3),
            "mb_per_s": round(self.fetched_bytes / transfer / 1e6, 2) if transfer > 0 else 0.0,
            "error": self.error,
        }


async def fetch_header(client: Any, uid: str, fingerprint: str, root: bytes, sources: Sequence[Source],
                       progress: DownloadProgress) -> ShardHeader:
    """The verified header from the first source that gives one."""
    errors = []
    for src in sources:
        try:
            return await client.header(src.peer_id, src.addrs, uid, root, fingerprint, HEADER_TIMEOUT_S)
        except ShardError as e:  # wrong hash / garbage: never ask this one again
            progress.bad_sources.append(src.name)
            errors.append(f"{src.name[-8:]}: {e}")
        except (RemoteError, ShardRequestError) as e:
            progress.failed_sources[src.name] = str(e)[:200]
            errors.append(f"{src.name[-8:]}: {e}")
    raise ShardDownloadError(f"no holder gave the header of {uid} ({'; '.join(errors)[:400] or 'no holders'})")


async def download_shard(client: Any, cache: Any, uid: str, fingerprint: str, root: bytes,
                         sources: Sequence[Source], progress: DownloadProgress,
                         on_chunk: Callable[[DownloadProgress], None] | None = None,
                         traffic: Traffic | None = None) -> ShardHeader:
    """Fetch ``root`` into ``cache`` (see module docstring); returns the verified header.
    ``traffic``: the node's download cap and byte meter (None: uncapped)."""
    sources = [s for s in dict.fromkeys(sources) if s.name not in progress.bad_sources]
    if not sources:
        raise ShardDownloadError(f"no holder to download {uid} from")
    header = await fetch_header(client, uid, fingerprint, root, sources, progress)
    sources = [s for s in sources if s.name not in progress.bad_sources]
    partial = await trio.to_thread.run_sync(cache.open_partial, header)
    progress.transfer_started_at = time.time()
    try:
        progress.version = header.version
        progress.total_bytes = header.total_bytes
        progress.chunks_total = header.num_chunks
        progress.have_bytes = progress.resumed_bytes = partial.bytes_present
        progress.chunks_done = len(partial.have)
        progress.state = "downloading"
        queue: deque[int] = deque(partial.missing())
        await _fetch_all(client, partial, header, uid, root, sources, queue, progress, on_chunk,
                         traffic)
        progress.state = "verifying"
        await trio.to_thread.run_sync(partial.finish)
    except BaseException as e:
        progress.state = "failed"
        progress.error = str(e)[:300] or type(e).__name__
        progress.finished_at = time.time()
        raise
    finally:
        partial.close()
    progress.state = "done"
    progress.finished_at = time.time()
    return header


async def _fetch_all(client: Any, partial: Any, header: ShardHeader, uid: str, root: bytes,
                     sources: list[Source], queue: deque[int], progress: DownloadProgress,
                     on_chunk: Callable[[DownloadProgress], None] | None,
                     traffic: Traffic | None = None) -> None:
    state = _Shared(queue)
    alive = {s.name for s in sources}

    async def worker(src: Source) -> None:
        while src.name in alive:
            index = await state.next_index()
            if index is None:
                return
            if src.name not in alive:  # dropped while this worker waited for work
                state.give_back(index)
                return
            try:
                if traffic is not None:
                    await traffic.receive_async(header.chunk_size(index))
                data = await client.chunk(src.peer_id, src.addrs, uid, root, index, CHUNK_TIMEOUT_S)
                progress.fetched_bytes += len(data)
                try:
                    await trio.to_thread.run_sync(partial.write_chunk, index, data)
                except OSError as e:  # this node's disk, not the holder's fault: stop, blame nobody
                    state.fatal = ShardDownloadError(f"cannot write the shard of {uid} to the cache: {e}")
                    nursery.cancel_scope.cancel()
                    return
            except (ShardHashError, ShardError) as e:
                log.warning("holder %s sent a bad chunk %d of %s (%s): not asking it again", src.name, index,
                            uid, e)
                alive.discard(src.name)
                if src.name not in progress.bad_sources:
                    progress.bad_sources.append(src.name)
                state.give_back(index)
                continue
            except (RemoteError, ShardRequestError, OSError) as e:
                state.give_back(index)
                fails = state.fail(src.name)
                progress.failed_sources[src.name] = str(e)[:200]
                if fails >= MAX_FAILURES:
                    log.info("dropping holder %s for %s after %d failures (%s)", src.name, uid, fails, e)
                    alive.discard(src.name)
                continue
            state.done()
            progress.have_bytes += header.chunk_size(index)
            progress.chunks_done += 1
            progress.by_source[src.name] = progress.by_source.get(src.name, 0) + 1
            if on_chunk is not None:
                on_chunk(progress)

    async with trio.open_nursery() as nursery:
        for src in sources:
            for _ in range(PER_SOURCE):
                nursery.start_soon(worker, src)
    if state.fatal is not None:
        raise state.fatal
    if state.queue or state.inflight:
        raise ShardDownloadError(
            f"every holder of {uid} failed with {len(state.queue)} chunk(s) left "
            f"(bad: {len(progress.bad_sources)}, failed: {', '.join(progress.failed_sources.values())[:300]})")


class _Shared:
    """The queue of missing chunks shared by all workers, with in-flight accounting."""

    def __init__(self, queue: deque[int]) -> None:
        self.queue = queue
        self.inflight = 0
        self.failures: dict[str, int] = {}
        self.fatal: ShardDownloadError | None = None
        self._changed = trio.Event()

    async def next_index(self) -> int | None:
        while True:
            if self.queue:
                self.inflight += 1
                return self.queue.popleft()
            if not self.inflight:
                return None
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def done(self) -> None:
        self.inflight -= 1
        self._notify()

    def give_back(self, index: int) -> None:
        self.inflight -= 1
        self.queue.appendleft(index)
        self._notify()

    def fail(self, name: str) -> int:
        self.failures[name] = self.failures.get(name, 0) + 1
        return self.failures[name]

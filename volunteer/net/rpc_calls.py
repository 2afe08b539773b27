"""The pieces of one expert-RPC client call: ``Pending`` (a call waiting for its reply,
settled exactly once, waking an async or a threaded caller) and ``Channel`` (one pooled
stream with its calls in flight), plus ``RpcClientStats``. Used by ``rpc_client.py``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import trio
from libp2p.abc import INetStream

from volunteer.wire.errors import RemoteError, UnreachableError


class Pending:
    """One call waiting for its reply: settled exactly once, in the loop, by ``finish``.

    An async caller waits on ``event`` (made on demand); a caller in another thread waits
    on ``lock`` (held until settled), so the reply wakes that thread straight from the
    reader task, with no trio task or ``from_thread`` round trip in between."""

    __slots__ = ("call_id", "chan", "deadline", "done", "error", "event", "frames", "lock")

    def __init__(self, call_id: int, threaded: bool = False) -> None:
        self.call_id = call_id
        self.chan: Channel | None = None
        self.deadline = math.inf
        self.done = False
        self.frames: list[bytes] | None = None
        self.error: RemoteError | None = None
        self.event: trio.Event | None = None
        self.lock: threading.Lock | None = None
        if threaded:
            self.lock = threading.Lock()
            self.lock.acquire()

    def finish(self, frames: list[bytes] | None = None, error: RemoteError | None = None) -> bool:
        """Settle the call (the first time only); True when this call settled it."""
        if self.done:
            return False
        self.done = True
        self.frames, self.error = frames, error
        if self.chan is not None:
            self.chan.pending.pop(self.call_id, None)
        if self.event is not None:
            self.event.set()
        if self.lock is not None:
            self.lock.release()
        return True

    def result(self) -> list[bytes]:
        if self.error is not None:
            raise self.error
        return self.frames  # type: ignore[return-value]


class Channel:
    """One stream with its in-flight calls."""

    def __init__(self, stream: INetStream, relayed: bool = False) -> None:
        self.stream = stream
        self.pending: dict[int, Pending] = {}
        self.write_lock = trio.Lock()
        self.broken = False
        self.relayed = relayed
        self.retired = False

    def fail_all(self, why: str) -> int:
        """Mark the stream broken and fail every call on it; how many were still waiting."""
        self.broken = True
        return sum(p.finish(error=UnreachableError(why)) for p in list(self.pending.values()))


@dataclass
class RpcClientStats:
    calls: int = 0
    streams_opened: int = 0
    timeouts: int = 0
    unreachable: int = 0
    streams_retired: int = 0
    replies_dropped: int = 0  # late or unknown replies, discarded unread
    reply_timeouts: int = 0  # streams reset because a reply came too slowly

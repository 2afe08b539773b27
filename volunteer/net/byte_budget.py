"""``ByteBudget``: a bound on the bytes a server holds for requests in flight, shared by all
its streams and peers.

A server reserves a message's declared size *before* reading its body (``try_reserve``)
and releases it once the reply went out (``release``). Beyond ``capacity`` the message is
refused with a typed "overloaded" error and its body is never read, so the bytes held for
requests stay under ``capacity`` in total however many peers send at once. ``peak`` is the
high-water mark (what tests and status reports look at). Thread-safe (one small lock): the
ZeroMQ side reserves in the serving loop thread, the libp2p side in the trio thread.
"""

from __future__ import annotations

import threading


class ByteBudget:
    """Reserve/release accounting of in-flight bytes against a fixed capacity."""

    def __init__(self, capacity: int) -> None:
        if int(capacity) <= 0:
            raise ValueError("ByteBudget capacity must be positive")
        self.capacity = int(capacity)
        self._held = 0
        self.peak = 0
        self.refused = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        return self._held

    def try_reserve(self, nbytes: int) -> bool:
        """Take ``nbytes`` if they fit (True), else count a refusal (False)."""
        n = max(0, int(nbytes))
        with self._lock:
            if self._held + n > self.capacity:
                self.refused += 1
                return False
            self._held += n
            if self._held > self.peak:
                self.peak = self._held
            return True

    def release(self, nbytes: int) -> None:
        """Give back what ``try_reserve`` took."""
        n = max(0, int(nbytes))
        with self._lock:
            self._held = max(0, self._held - n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"capacity": self.capacity, "held": self._held, "peak": self.peak,
                    "refused": self.refused}

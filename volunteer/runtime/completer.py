"""``Completer``: finishes GPU batches off the serving loop, so the loop never waits on the device.

On a CUDA expert the executor only *launches* a batch (uploads, kernels, the optimizer step
and the download of the results into pinned host memory are all queued on the device) and
hands the rest to this thread: wait for the batch's CUDA event (the one device
synchronisation per batch, with the GIL released), then slice, encode and send the replies.
Meanwhile the loop thread decodes and launches the next batch, so the device runs batch
after batch without idling while Python builds replies, and the host work of one batch
overlaps the device work of the next.

At most ``depth`` batches are in flight: ``submit`` blocks the loop while the queue is full
(backpressure instead of unbounded pinned memory). Finishers run in submission order, one
at a time. ``wait_idle`` returns once everything submitted has finished (checkpoints and
expert removal wait for it, so they read weights the device has finished updating).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

DEFAULT_DEPTH = 2  # one batch computing, one being launched behind it


class Completer:
    """One thread that runs finishers in order; at most ``depth`` pending."""

    def __init__(
        self,
        depth: int = DEFAULT_DEPTH,
        on_done: Callable[[], None] | None = None,
        name: str = "volunteer-complete",
    ) -> None:
        """``on_done()`` runs after each finisher, once it no longer counts as pending."""
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self.depth = depth
        self._on_done = on_done
        self._queue: collections.deque[Callable[[], None]] = collections.deque()
        self._cond = threading.Condition()
        self._pending = 0  # queued + running
        self.finished = 0  # finishers run so far
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Batches submitted and not finished yet."""
        return self._pending

    def submit(self, finish: Callable[[], None]) -> None:
        """Queue ``finish`` (blocks while ``depth`` are pending); runs it inline once stopped."""
        with self._cond:
            while self._pending >= self.depth and not self._stopping:
                self._cond.wait()
            if not self._stopping:
                self._queue.append(finish)
                self._pending += 1
                self._cond.notify_all()
                return
        _safe(finish)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def stop(self) -> None:
        """Finish what is queued, then end the thread (idempotent)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                finish = self._queue.popleft()
            _safe(finish)
            with self._cond:
                self._pending -= 1
                self.finished += 1
                self._cond.notify_all()
            if self._on_done is not None:
                _safe(self._on_done)


def _safe(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:
        log.exception("error finishing a batch")

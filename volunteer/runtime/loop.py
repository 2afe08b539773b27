"""``ServingLoop``: the runtime's single thread that does both IO and compute.

One thread polls the registered file descriptors and a wake-up pipe with ``epoll``, hands
ready descriptors to their handlers (which read requests and submit them), runs callbacks
queued from other threads, runs periodic timers (connection deadlines), and runs one batch
whenever work is waiting. The runtime's loop runs the batches (its ``step``) and has no
descriptors of its own; the ZeroMQ frontend runs a second loop, with no ``step``, for its
sockets (``volunteer.runtime.zmtp_server``), so requests keep arriving while a batch
computes and are merged into the next batch right after it.

Other threads talk to the loop only through ``call_soon(fn, *args)``, ``run_sync`` and
``wake()``; ``register`` / ``modify`` / ``unregister`` / ``every`` are for the loop thread
(or for setup code through ``call_soon``): every descriptor registered here is used by the
loop thread alone.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

READ = select.EPOLLIN
WRITE = select.EPOLLOUT
Handler = Callable[[int], None]  # gets the ready event mask


class ServingLoop:
    """Poll descriptors + run work in one thread. ``step`` runs one unit of work, returns if more is ready."""

    def __init__(self, step: Callable[[], bool], on_exit: Callable[[], None],
                 name: str = "volunteer-runtime") -> None:
        self.name = name
        self._step = step
        self._on_exit = on_exit
        self._calls: collections.deque = collections.deque()
        self._handlers: dict[int, Handler] = {}
        self._timers: list[list] = []  # [next_due, interval, fn]
        self._exit_hooks: list[Callable[[], None]] = []
        self._next_timer = 0.0
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._epoll.register(self._wake_r, READ)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._finished = False  # no more queued calls will run: call_soon runs inline
        self._lock = threading.Lock()
        self.ident: int | None = None

    # -- any thread --

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def in_loop(self) -> bool:
        return threading.get_ident() == self.ident

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def call_soon(self, fn: Callable, *args: object) -> None:
        """Run ``fn(*args)`` in the loop thread (soon, even if a batch is waiting); once the
        loop has exited, run it right here instead (nothing is ever dropped)."""
        with self._lock:
            queued = not self._finished
            if queued:
                self._calls.append((fn, args))
        if not queued:
            _safe(fn, *args)
        elif not self.in_loop():
            self.wake()

    def run_sync(self, fn: Callable[[], None], timeout: float = 10.0) -> bool:
        """Run ``fn()`` in the loop thread and wait for it; False if the loop is gone (then
        ``fn`` did not run, or ran inline in this thread after the loop's exit)."""
        if self.in_loop():
            _safe(fn)
            return True
        if not self.alive:
            return False
        done = threading.Event()

        def call() -> None:
            try:
                fn()
            finally:
                done.set()

        self.call_soon(call)
        return done.wait(timeout) or not self.alive

    def stop(self) -> None:
        """Ask the loop to exit and wait for it (from any thread but the loop's own)."""
        self._stopping = True
        self.wake()
        if self._thread is None:  # never started: nothing will run queued calls
            with self._lock:
                self._finished = True
            self._run_calls()
            self._run_exit_hooks()
            self._close()
        elif not self.in_loop():
            self._thread.join()

    # -- loop thread (or before start) --

    def register(self, fd: int, events: int, handler: Handler) -> None:
        """Call ``handler(events)`` whenever ``fd`` is ready for ``events`` (READ / WRITE)."""
        self._epoll.register(fd, events)
        self._handlers[fd] = handler

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def unregister(self, fd: int) -> None:
        """Forget ``fd`` (call before closing it)."""
        if self._handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def every(self, interval_s: float, fn: Callable[[], None]) -> list:
        """Run ``fn()`` every ``interval_s`` seconds (roughly); returns a handle for ``cancel``."""
        timer = [time.monotonic() + interval_s, interval_s, fn]
        self._timers.append(timer)
        self._next_timer = min(self._next_timer, timer[0])
        return timer

    def cancel(self, timer: list) -> None:
        with contextlib.suppress(ValueError):
            self._timers.remove(timer)

    def on_exit(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` when the loop exits (to close what was registered)."""
        self._exit_hooks.append(fn)

    def remove_exit_hook(self, fn: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._exit_hooks.remove(fn)

    # -- internals --

    def _run_calls(self) -> None:
        while self._calls:
            fn, args = self._calls.popleft()
            _safe(fn, *args)

    def _run_timers(self) -> float | None:
        """Run due timers; seconds until the next one (None: no timers)."""
        if not self._timers:
            return None
        now = time.monotonic()
        nearest = None
        for timer in list(self._timers):
            if timer[0] <= now:
                timer[0] = now + timer[1]
                _safe(timer[2])
            if nearest is None or timer[0] < nearest:
                nearest = timer[0]
        return None if nearest is None else max(0.0, nearest - now)

    def _run_exit_hooks(self) -> None:
        hooks, self._exit_hooks = self._exit_hooks, []
        for fn in hooks:
            _safe(fn)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._epoll.close()

    def _run(self) -> None:
        self.ident = threading.get_ident()
        more = False
        poll = self._epoll.poll
        wake_r = self._wake_r
        handlers = self._handlers
        try:
            while not self._stopping:
                if self._calls:
                    self._run_calls()
                if self._timers and time.monotonic() >= self._next_timer:
                    left = self._run_timers()
                    self._next_timer = time.monotonic() + (left if left is not None else 3600.0)
                if more or self._calls:
                    timeout = 0.0
                elif self._timers:
                    timeout = max(0.0, self._next_timer - time.monotonic())
                else:
                    timeout = -1.0
                try:
                    events = poll(timeout)
                except InterruptedError:
                    events = []
                for fd, ev in events:
                    if fd == wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 65536)
                        continue
                    handler = handlers.get(fd)
                    if handler is not None:
                        try:
                            handler(ev)
                        except Exception:
                            log.exception("error in the serving loop (fd %d handler)", fd)
                if self._calls:
                    self._run_calls()
                more = self._step()
        finally:
            self._run_calls()
            _safe(self._on_exit)
            with self._lock:
                self._finished = True
            self._run_calls()
            self._run_exit_hooks()
            self._close()


def _safe(fn: Callable, *args: object) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("error in the serving loop (callback %r)", fn)

"""``ServingLoop``: the runtime's single thread that does both IO and compute.

One thread polls the attached ZeroMQ sockets and a wake-up pipe, hands readable sockets to
their handlers (which submit requests), runs callbacks queued from other threads, and runs
one batch whenever work is waiting. Doing IO and compute in the same thread removes two
thread hand-offs per request (receive -> scheduler -> sender), which dominate the round trip
of small requests on a 2-core machine; while a batch computes, libzmq's own IO thread keeps
receiving, and the messages are picked up (and merged into the next batch) right after it.

Other threads talk to the loop only through ``call_soon(fn, *args)`` and ``wake()``; every
socket attached to the loop is used by the loop thread alone.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from collections.abc import Callable

import zmq

log = logging.getLogger(__name__)


class ServingLoop:
    """Poll sockets + run work in one thread. ``step`` runs one unit of work, returns if more is ready."""

    def __init__(self, step: Callable[[], bool], on_exit: Callable[[], None]) -> None:
        self._step = step
        self._on_exit = on_exit
        self._calls: collections.deque = collections.deque()
        self._sources: dict[
            zmq.Socket, tuple[Callable[[zmq.Socket], None], Callable[[zmq.Socket], None]]
        ] = {}
        self._poller = zmq.Poller()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._finished = False  # no more queued calls will run: call_soon runs inline
        self._lock = threading.Lock()
        self.ident: int | None = None

    # -- any thread --

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="volunteer-runtime", daemon=True)
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

    def attach(
        self,
        sock: zmq.Socket,
        on_readable: Callable[[zmq.Socket], None],
        on_detach: Callable[[zmq.Socket], None],
    ) -> None:
        """Hand ``sock`` to the loop; ``on_detach(sock)`` runs in the loop when it lets go."""
        self.call_soon(self._attach, sock, on_readable, on_detach)

    def detach(self, sock: zmq.Socket, timeout: float = 10.0) -> bool:
        """Take ``sock`` back (its on_detach runs in the loop); False if the loop is gone."""
        if self.in_loop():
            self._detach(sock)
            return True
        if not self.alive:
            return False
        done = threading.Event()
        self.call_soon(lambda: (self._detach(sock), done.set()))
        return done.wait(timeout) or not self.alive

    def stop(self) -> None:
        """Ask the loop to exit and wait for it (from any thread but the loop's own)."""
        self._stopping = True
        self.wake()
        if self._thread is None:  # never started: nothing will run queued calls
            with self._lock:
                self._finished = True
            self._run_calls()
            if not self._closed:
                self._closed = True
                os.close(self._wake_r)
                os.close(self._wake_w)
        elif not self.in_loop():
            self._thread.join()

    # -- loop thread --

    def _attach(self, sock: zmq.Socket, on_readable: Callable, on_detach: Callable) -> None:
        self._sources[sock] = (on_readable, on_detach)
        self._poller.register(sock, zmq.POLLIN)

    def _detach(self, sock: zmq.Socket) -> None:
        entry = self._sources.pop(sock, None)
        if entry is not None:
            self._poller.unregister(sock)
            _safe(entry[1], sock)

    def _run_calls(self) -> None:
        while self._calls:
            fn, args = self._calls.popleft()
            _safe(fn, *args)

    def _run(self) -> None:
        self.ident = threading.get_ident()
        more = False
        poll = self._poller.poll
        wake_r = self._wake_r
        sources = self._sources
        try:
            while not self._stopping:
                if self._calls:
                    self._run_calls()
                try:
                    events = poll(0 if (more or self._calls) else None)
                except zmq.ZMQError as e:  # e.g. a socket closed under us
                    log.warning("poll failed: %s", e)
                    events = []
                for sock, _ in events:
                    if sock == wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 65536)
                        continue
                    entry = sources.get(sock)
                    if entry is not None:
                        _safe(entry[0], sock)
                if self._calls:
                    self._run_calls()
                more = self._step()
        finally:
            self._run_calls()
            _safe(self._on_exit)
            with self._lock:
                self._finished = True
            self._run_calls()
            for sock in list(self._sources):
                self._detach(sock)
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)


def _safe(fn: Callable, *args: object) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("error in the serving loop (callback %r)", fn)

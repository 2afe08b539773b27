"""A trio event loop in a background thread, with a synchronous facade.

py-libp2p is trio-only while the daemon and trainers are synchronous (ZeroMQ + torch), so
every libp2p node runs in one ``TrioThread``. ``start(main)`` runs ``main(task_status)``
in the loop and returns what ``main`` passes to ``task_status.started(...)`` once it is
ready (or raises what ``main`` raised while starting). ``call(async_fn, *args)`` runs a
coroutine in the loop from any other thread and returns its result; ``stop()`` cancels
everything and joins the thread.

State created in the loop (the libp2p host, DHT, NAT traversal, RPC server statistics) is
owned by the loop's thread: other threads read it only through ``run_sync(fn)``, which runs
``fn`` in the loop (directly when already there) and returns its plain result. Accessors of
such state call ``check_owner()`` first, so a read from the wrong thread fails loudly
instead of racing the loop.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class TrioThreadError(RuntimeError):
    """The loop is not running (not started, failed, or stopped)."""


class TrioThread:
    """One trio loop in a daemon thread (see module docstring)."""

    def __init__(self, name: str = "trio") -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._ready = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    @property
    def token(self) -> trio.lowlevel.TrioToken:
        if self._token is None or not self.running:
            raise TrioThreadError(f"{self.name}: event loop is not running")
        return self._token

    def start(self, main: Callable[..., Awaitable[Any]], timeout: float = 60.0) -> Any:
        if self._thread is not None:
            raise TrioThreadError(f"{self.name}: already started")
        self._thread = threading.Thread(target=self._run, args=(main,), name=self.name,
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"{self.name}: not ready after {timeout:.0f} s")
        if self._error is not None:
            self._thread.join(timeout=10)
            raise self._error
        return self._value

    def _run(self, main: Callable[..., Awaitable[Any]]) -> None:
        try:
            trio.run(self._root, main)
        except BaseException as e:
            if not self._ready.is_set():
                self._error = e
        finally:
            self._ready.set()

    async def _root(self, main: Callable[..., Awaitable[Any]]) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                self._value = await nursery.start(main)
                self._ready.set()

    def call(self, async_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run ``async_fn(*args)`` in the loop; block until done (use trio timeouts inside)."""
        try:
            return trio.from_thread.run(async_fn, *args, trio_token=self.token)
        except trio.RunFinishedError:
            raise TrioThreadError(f"{self.name}: event loop stopped") from None

    def in_loop(self) -> bool:
        """True when the calling thread is this loop's thread."""
        return self._thread is not None and threading.current_thread() is self._thread

    def check_owner(self, what: str) -> None:
        """Raise ``TrioThreadError`` unless the caller may touch loop-owned state: it runs in
        the loop, or the loop is not running (not started yet, or stopped: no owner left)."""
        if self.running and not self.in_loop():
            raise TrioThreadError(f"{self.name}: {what} is owned by the event loop thread; "
                                  f"read it through run_sync, not from {threading.current_thread().name}")

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the sync ``fn(*args)`` in the loop and return its result (see module docstring).

        In the loop thread it is a plain call; while the loop runs, other threads block until
        the loop has run it; before start or after stop (no loop owns the state) it runs here.
        """
        if self.in_loop() or not self.running:
            return fn(*args)
        try:
            return trio.from_thread.run_sync(fn, *args, trio_token=self.token)
        except (trio.RunFinishedError, TrioThreadError):
            if self.running:
                raise
            return fn(*args)  # the loop ended meanwhile: nobody owns the state any more

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule a sync ``fn(*args)`` in the loop without waiting (thread-safe)."""
        try:
            self.token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            raise TrioThreadError(f"{self.name}: event loop stopped") from None

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything in the loop and join the thread (idempotent)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        if self._token is not None and self._scope is not None:
            try:
                self._token.run_sync_soon(self._scope.cancel)
            except trio.RunFinishedError:
                pass
        thread.join(timeout)

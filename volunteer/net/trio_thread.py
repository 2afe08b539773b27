"""A trio event loop in a background thread, with a synchronous facade.

py-libp2p is trio-only while the daemon and trainers are synchronous (ZeroMQ + torch), so
every libp2p node runs in one ``TrioThread``. ``start(main)`` runs ``main(task_status)``
in the loop and returns what ``main`` passes to ``task_status.started(...)`` once it is
ready (or raises what ``main`` raised while starting). ``call(async_fn, *args)`` runs a
coroutine in the loop from any other thread and returns its result; ``stop()`` cancels
everything and joins the thread.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any

import trio


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

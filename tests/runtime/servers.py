"""Test helpers: real runtimes (+ ZeroMQ frontends on loopback) that are always torn down,
reply collectors for in-process ``submit`` calls, and a polling ``wait_for``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import torch

from volunteer.experts.backend import ExpertBackend, OptimizerSpec
from volunteer.runtime.limits import ServingLimits
from volunteer.runtime.runtime import Runtime
from volunteer.runtime.zmq_frontend import ZmqFrontend
from volunteer.wire.messages import Reply, decode_reply


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` until true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def make_backends(
    specs: dict[str, tuple[str, int]], optimizer: OptimizerSpec | None = None, seed: int = 0
) -> dict[str, ExpertBackend]:
    """``{uid: (kind, hidden)}`` -> backends with deterministic weights."""
    torch.manual_seed(seed)
    opt = optimizer or OptimizerSpec("sgd", lr=0.01)
    return {uid: ExpertBackend(uid, kind, h, opt) for uid, (kind, h) in specs.items()}


@contextlib.contextmanager
def running(
    backends: dict[str, ExpertBackend],
    limits: ServingLimits | None = None,
    zmq: bool = True,
    pipeline: bool | None = None,
) -> Iterator[tuple[Runtime, ZmqFrontend | None]]:
    """A started runtime (and frontend on 127.0.0.1, port 0), stopped on exit."""
    runtime = Runtime(backends, limits or ServingLimits(), pipeline=pipeline)
    frontend = None
    runtime.start()
    try:
        if zmq:
            frontend = ZmqFrontend(runtime)
            frontend.start()
        yield runtime, frontend
    finally:
        if frontend is not None:
            frontend.stop()
        runtime.stop()


class Replies:
    """Collects replies of in-process submits, in the order they arrive."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.frames: list[tuple[str, list]] = []

    def callback(self, tag: str) -> Callable[[list], None]:
        def reply(frames: list) -> None:
            with self._lock:
                self.frames.append((tag, [bytes(memoryview(f).cast("B")) for f in frames]))

        return reply

    def count(self) -> int:
        with self._lock:
            return len(self.frames)

    def wait(self, n: int, timeout: float = 10.0) -> None:
        wait_for(lambda: self.count() >= n, timeout, f"{n} replies")

    def order(self) -> list[str]:
        with self._lock:
            return [tag for tag, _ in self.frames]

    def decoded(self, tag: str) -> Reply:
        """The decoded reply for ``tag`` (raises the typed error for error replies)."""
        with self._lock:
            frames = next(f for t, f in self.frames if t == tag)
        return decode_reply(frames)


def submit_sync(rt, frames: list) -> list:
    """Submit one request to ``rt`` in-process and return its reply frames (waits for it)."""
    replies = Replies()
    rt.submit(frames, replies.callback("r"))
    replies.wait(1)
    return replies.frames[0][1]

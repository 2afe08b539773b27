"""The ``Transport`` protocol: how clients send one request (a list of frames) and get the
reply frames back. Transports move frames; they never parse them. Implementations:
``volunteer.client.zmq_transport.ZmqTransport`` (direct TCP) and
``volunteer.net.rpc_client.Libp2pTransport`` (libp2p streams).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

Frame = bytes | memoryview


@runtime_checkable
class Transport(Protocol):
    """Thread-safe request/reply; raises RemoteTimeoutError or UnreachableError."""

    def request(self, frames: Sequence[Frame], timeout: float) -> list[Frame]: ...

    def close(self) -> None: ...

"""An ``AveragingGroup`` inside one process: members are threads, the "network" is a hub.

The thesis-table experiment and the averaging tests use it to measure the methods without
sockets, yet under the same contract as the libp2p group (``group.py``): an exchange runs
the peer's handler in the *peer's* small thread pool (its "server threads") and returns
within ``timeout`` or raises a typed error; tensors are copied both ways, as bytes on a wire
would be, so no member ever aliases another's parameters. ``kill()`` makes a member vanish
as a crash would: it stops being listed, every exchange with it fails ``UnreachableError``,
and an answer it was computing is lost.
"""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from volunteer.client.averaging.group import Exchange, ExchangeHandler
from volunteer.wire.errors import (
    InternalError,
    OverloadedError,
    RemoteError,
    RemoteTimeoutError,
    UnreachableError,
)

HANDLER_THREADS = 4


class LocalHub:
    """The registry of one in-process group's live members (a stand-in for the DHT)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._members: dict[str, LocalGroup] = {}

    def _join(self, member: LocalGroup) -> None:
        with self._lock:
            if member.me in self._members:
                raise ValueError(f"peer_id: {member.me!r} is already a member; pick another id")
            self._members[member.me] = member

    def _leave(self, member: LocalGroup) -> None:
        with self._lock:
            if self._members.get(member.me) is member:
                del self._members[member.me]

    def _get(self, peer: str) -> LocalGroup | None:
        with self._lock:
            return self._members.get(peer)

    def peers(self) -> list[str]:
        """Every live member's id, sorted."""
        with self._lock:
            return sorted(self._members)


def _copy(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().to("cpu", copy=True) for t in tensors]


class LocalGroup:
    """One member of a ``LocalHub``; implements ``AveragingGroup``. ``hub``: the shared
    in-process hub (threads of one process: tests, experiments); ``peer_id``: this member's
    name, unique within the hub."""

    def __init__(self, hub: LocalHub, peer_id: str) -> None:
        self._hub = hub
        self._me = str(peer_id)
        self._handler: ExchangeHandler | None = None
        self._alive = True
        self._pool = ThreadPoolExecutor(max_workers=HANDLER_THREADS,
                                        thread_name_prefix=f"local-group-{self._me}")
        hub._join(self)

    @property
    def me(self) -> str:
        """This member's peer id."""
        return self._me

    @property
    def alive(self) -> bool:
        """False once closed or killed."""
        return self._alive

    def members(self) -> list[str]:
        """The other live members (never ``me``)."""
        return [p for p in self._hub.peers() if p != self._me]

    def serve(self, handler: ExchangeHandler) -> None:
        """Answer other members' exchanges with ``handler`` from now on."""
        self._handler = handler

    def exchange(self, peer: str, request: Exchange, timeout: float) -> list[torch.Tensor]:
        """Run ``peer``'s handler on a copy of ``request`` in the peer's thread pool and
        return a copy of its answer within ``timeout`` s, or raise a typed ``RemoteError``."""
        if not self._alive:
            raise UnreachableError(f"{self._me} has left the group")
        target = self._hub._get(peer)
        if target is None or peer == self._me:
            raise UnreachableError(f"{peer!r} is not a live member")
        sent = Exchange(request.kind, request.round, _copy(request.tensors), request.alpha)
        try:
            future = target._pool.submit(target._answer, self._me, sent)
        except RuntimeError as exc:  # its pool shut down meanwhile
            raise UnreachableError(f"{peer!r} left the group") from exc
        try:
            reply = future.result(timeout=timeout)
        except FutureTimeout as exc:
            future.cancel()
            raise RemoteTimeoutError(f"{peer!r} did not answer within {timeout:.3g} s") from exc
        except CancelledError as exc:
            raise UnreachableError(f"{peer!r} left the group") from exc
        if not target._alive:
            raise UnreachableError(f"{peer!r} left the group before answering")
        return reply

    def _answer(self, sender: str, request: Exchange) -> list[torch.Tensor]:
        """The callee's side, in its pool: the handler's answer or a typed error."""
        if not self._alive:
            raise UnreachableError(f"{self._me} has left the group")
        handler = self._handler
        if handler is None:
            raise OverloadedError(f"{self._me} is not averaging yet; try later")
        try:
            reply = handler(sender, request)
        except RemoteError:
            raise
        except Exception as exc:  # a handler bug is answered, typed
            raise InternalError(f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(reply, list) or not all(isinstance(t, torch.Tensor) for t in reply):
            raise InternalError("handler answered something other than a list of tensors")
        return _copy(reply)

    def close(self) -> None:
        """Leave the group: stop being listed and stop answering."""
        self._alive = False
        self._hub._leave(self)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def kill(self) -> None:
        """Vanish as a crashed process would (same effect as ``close`` in one process: the
        answer of a handler still running is dropped)."""
        self.close()

"""``AveragingGroup`` over the real swarm: ``ExchangeServer`` (one per host) and ``SwarmGroup``.

Both are built on a ``PeerChannel`` (``group.py``): a trainer's ``ClientNode`` or a volunteer
daemon's ``NetworkService`` carries the frames on libp2p streams of
``/volunteer/averaging/1.0.0`` (direct, hole-punched or relayed connections), so every byte
of the averaging path is shared by trainers and the replicas of one expert.

- ``ExchangeServer(channel)``: the host's one answerer. Inbound messages are dispatched by
  group name (``wire.decode_exchange_message``: bounded and typed) to the handler that
  ``register(group, handler)`` installed. Decoding, the handler and encoding the answer run
  in a small bounded worker pool (``workers`` threads, at most ``max_pending`` messages
  queued or running), never in the network loop: a full pool, an unknown group or a group
  whose handler is not installed yet is answered ``overloaded`` (try later); whatever a
  handler raises is answered as a typed error (a ``RemoteError`` as itself, anything else as
  ``internal``). Every message is answered exactly once.
- ``SwarmGroup(server, channel, group, me, members)``: one member's view of one group. The
  members come from a provider (``membership.DhtMembership`` reads them from the DHT, with
  the experiment's admission filter); ``exchange`` encodes, sends with the caller's timeout,
  decodes the answer with the wire limits, and raises only ``RemoteError`` subclasses for a
  peer's fault (``RemoteTimeoutError``, ``UnreachableError``, the peer's typed refusal, or
  ``BadRequestError``/``NonFiniteError`` for an answer that is malformed or not finite).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from volunteer.client.averaging.group import Exchange, ExchangeHandler, PeerChannel
from volunteer.client.averaging.wire import (
    AVERAGING_LIMITS,
    decode_answer,
    decode_exchange_message,
    encode_answer,
    encode_exchange,
    encode_refusal,
)
from volunteer.wire.errors import (
    InternalError,
    OverloadedError,
    RemoteError,
    RemoteTimeoutError,
    UnreachableError,
)
from volunteer.wire.limits import WireLimits

log = logging.getLogger(__name__)

Reply = Callable[[list], None]
MembersProvider = Callable[[], list[tuple[str, list[str]]]]
WORKERS = 2
MAX_PENDING = 8
NEWCOMER_REFRESH_S = 1.0  # at most one forced membership read per this many seconds


class ExchangeServer:
    """Answers inbound exchanges for every group of one host (see module docstring).

    ``channel``: the host's ``PeerChannel`` (a ``ClientNode``'s or a daemon's). ``workers``:
    threads decoding and answering exchanges (default 2); ``max_pending``: messages queued
    or running before new ones are answered ``overloaded`` (default 8): raise both only for
    large groups with small parameters. ``limits``: bounds on an inbound message
    (``AVERAGING_LIMITS``), checked before allocation; raise ``max_bytes`` for models whose
    averaged parameters are larger. ``ClientNode.averaging_group`` builds the one per node.
    """

    def __init__(self, channel: PeerChannel, *, workers: int = WORKERS,
                 max_pending: int = MAX_PENDING, limits: WireLimits = AVERAGING_LIMITS) -> None:
        if workers < 1 or max_pending < workers:
            raise ValueError("ExchangeServer: workers >= 1 and max_pending >= workers")
        self.limits = limits
        self.max_pending = max_pending
        self._handlers: dict[str, ExchangeHandler] = {}
        self._lock = threading.Lock()
        self._pending = 0
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=workers,
                                        thread_name_prefix="volunteer-averaging")
        self.answered = 0
        self.refused: dict[str, int] = {}
        self._channel = channel
        channel.serve(self.submit)

    def register(self, group: str, handler: ExchangeHandler) -> None:
        """Answer ``group``'s exchanges with ``handler`` from now on (replaces any)."""
        with self._lock:
            self._handlers[group] = handler

    def unregister(self, group: str) -> None:
        """Stop answering ``group`` (its exchanges are answered ``overloaded`` from now on)."""
        with self._lock:
            self._handlers.pop(group, None)

    def groups(self) -> list[str]:
        """The groups whose exchanges are answered now."""
        with self._lock:
            return sorted(self._handlers)

    def submit(self, peer: str, frames: list, reply: Reply) -> None:
        """The channel's entry point: never blocks, answers every message exactly once."""
        with self._lock:
            if self._closed or self._pending >= self.max_pending:
                why = "closed" if self._closed else f"{self._pending} exchanges in progress"
                full = True
            else:
                self._pending += 1
                full = False
        if full:
            self._refuse(reply, OverloadedError(f"averaging server busy ({why}); try later"))
            return
        try:
            self._pool.submit(self._work, peer, frames, reply)
        except RuntimeError:  # the pool was shut down meanwhile
            self._done()
            self._refuse(reply, OverloadedError("averaging server closed; try later"))

    def _work(self, peer: str, frames: list, reply: Reply) -> None:
        """Decode, dispatch, encode (in a worker thread)."""
        try:
            try:
                msg = decode_exchange_message(frames, self.limits)
                with self._lock:
                    handler = self._handlers.get(msg.group)
                if handler is None:
                    raise OverloadedError(f"group {msg.group!r} is not served here (yet); "
                                          "try later")
                answer = encode_answer(handler(peer, msg.exchange), msg.compression)
            except RemoteError as e:
                self._refuse(reply, e)
                return
            except Exception as e:  # a handler's bug is the peer's "internal", never ours
                log.warning("averaging handler failed for %s: %r", peer[-8:], e)
                self._refuse(reply, InternalError(f"handler failed: {type(e).__name__}"))
                return
            with self._lock:
                self.answered += 1
            reply(answer)
        finally:
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1

    def _refuse(self, reply: Reply, error: RemoteError) -> None:
        with self._lock:
            self.refused[error.code] = self.refused.get(error.code, 0) + 1
        reply(encode_refusal(error))

    def close(self) -> None:
        """Answer ``overloaded`` from now on; running handlers finish in their threads."""
        with self._lock:
            self._closed = True
            self._handlers.clear()
        self._pool.shutdown(wait=False, cancel_futures=False)


class SwarmGroup:
    """One member of one averaging group over a ``PeerChannel`` (see module docstring).
    Built by ``ClientNode.averaging_group(run_id)``; construct it directly only on a host of
    your own.

    Args:
        server: the host's ``ExchangeServer`` (answers this group's inbound exchanges).
        channel: the ``PeerChannel`` frames travel on.
        group: the group's name; every member uses the same one.
        me: this member's peer id (never listed among the others).
        members: provider of the current ``(peer id, addrs)`` list (``DhtMembership``).
        compression: None, ``"fp16"`` or ``"bf16"`` for the parameters sent (half the bytes
            of float32); int8 is refused for parameters.
        limits: bounds on answers read from members (``AVERAGING_LIMITS``).
        members_only: True (default): exchanges from peers the provider does not list are
            answered ``overloaded``; False: anyone who knows the group name may exchange.
        on_close: called once by ``close()`` (the node withdraws its DHT entry there).
    """

    def __init__(self, server: ExchangeServer, channel: PeerChannel, group: str, me: str,
                 members: MembersProvider, *, compression: str | None = None,
                 limits: WireLimits = AVERAGING_LIMITS, members_only: bool = True,
                 on_close: Callable[[], None] | None = None) -> None:
        self.server = server
        self.members_only = members_only
        self.channel = channel
        self.group = group
        self.compression = compression
        self.limits = limits
        self._me = me
        self.provider = members
        self._on_close = on_close
        self._addrs: dict[str, list[str]] = {}
        self._refresh_lock = threading.Lock()
        self._forced_refresh_at = float("-inf")
        self._closed = False

    @property
    def me(self) -> str:
        """This member's peer id."""
        return self._me

    def members(self) -> list[str]:
        """The other members the provider lists now (deduplicated, never ``me``)."""
        listed: dict[str, list[str]] = {}
        for peer, addrs in self.provider():
            if peer != self._me and peer not in listed:
                listed[peer] = list(addrs)
        self._addrs.update(listed)
        return list(listed)

    def serve(self, handler: ExchangeHandler) -> None:
        """Answer exchanges of this group with ``handler``; with ``members_only`` (default)
        a sender the provider does not list (a stranger the admission filter dropped, or a
        newcomer not seen yet) is answered ``overloaded`` without calling it."""
        if self._closed:
            raise RuntimeError(f"averaging group {self.group} is closed")
        if not self.members_only:
            self.server.register(self.group, handler)
            return

        def members_only(sender: str, request: Exchange) -> list[torch.Tensor]:
            known = sender != self._me and (sender in {p for p, _a in self.provider()}
                                            or self._listed_after_refresh(sender))
            if not known:
                raise OverloadedError(f"{sender[-8:]} is not a member of {self.group} as this "
                                      "peer sees it (yet); try later")
            return handler(sender, request)

        self.server.register(self.group, members_only)

    def _listed_after_refresh(self, sender: str) -> bool:
        """Whether a fresh membership read lists ``sender``: a newcomer that found us may
        have joined after our cached read (seen in the NAT lab: the first exchange of a
        pair refused). At most one forced read per ``NEWCOMER_REFRESH_S`` whatever senders
        ask, so a stranger cannot make us query the DHT once per request; it runs in the
        exchange server's bounded worker pool, never in the network loop."""
        refresh = getattr(self.provider, "refresh", None)
        if refresh is None:
            return False
        now = time.monotonic()
        with self._refresh_lock:
            if now - self._forced_refresh_at < NEWCOMER_REFRESH_S:
                return False
            self._forced_refresh_at = now
        return sender in {p for p, _a in refresh()}

    def exchange(self, peer: str, request: Exchange, timeout: float) -> list[torch.Tensor]:
        """Send ``request`` to ``peer``; its answer's tensors within ``timeout`` s, or a
        ``RemoteError`` (see the module docstring)."""
        if peer == self._me:
            raise ValueError("a member does not exchange with itself")
        if not timeout > 0:
            raise ValueError("timeout must be > 0")
        frames = encode_exchange(self.group, request, self.compression)
        deadline = time.monotonic() + timeout
        addrs = self._addrs.get(peer)
        if addrs is None:  # not seen by members() yet: look once
            self.members()
            addrs = self._addrs.get(peer, [])
        left = deadline - time.monotonic()
        if left <= 0:
            raise RemoteTimeoutError(f"no time left to reach {peer[-8:]} (membership lookup)")
        try:
            reply = self.channel.request(peer, list(addrs), frames, left)
        except RemoteError:
            raise
        except Exception as e:  # a channel must raise typed errors; never let others out
            raise UnreachableError(f"averaging channel failed: {type(e).__name__}: {e}"[:300]) \
                from None
        return decode_answer(reply, self.limits)

    def close(self) -> None:
        """Stop answering, then leave the membership (``on_close``); idempotent."""
        if self._closed:
            return
        self._closed = True
        self.server.unregister(self.group)
        if self._on_close is not None:
            self._on_close()


def static_members(peers: Sequence[tuple[str, Sequence[str]]]) -> MembersProvider:
    """A provider that always lists ``peers`` (tests, fixed groups)."""
    fixed = [(p, list(a)) for p, a in peers]
    return lambda: list(fixed)

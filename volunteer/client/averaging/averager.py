"""``Averager``: one worker's side of the thesis's methods over an ``AveragingGroup``.

It owns nothing but a view of the worker's parameters, a lock over them, and a bounded
buffer of peers' gradients. Outbound: ``all_reduce_grads(step)`` (gradAllReduce) and
``gossip(step)`` (elasticGossip / gossipingSgd); inbound: the ``ExchangeHandler`` it installs
with ``group.serve``, which answers the four exchange kinds of ``group.py``.

Why it is safe to run beside training and among hostile peers:

- Parameters change only under ``averager.lock`` (the trainer's optimizer step takes it
  too); an outbound exchange never holds it, so two members exchanging with each other at
  once cannot deadlock. A peer's ``elastic`` or ``gossip_push`` is answered at once but, by
  default (``defer_inbound=True``), *applied* only by ``apply_pending()``, which the trainer
  calls between steps (``CollaborativeOptimizer.step`` does): changing a weight in place
  while the trainer's forward/backward runs would break autograd (tensors saved for
  backward) and mix two versions of the model in one step. At most ``max_pending`` updates
  wait; more are answered ``overloaded``. ``defer_inbound=False`` applies them in the
  handler under the lock, for owners that hold the lock across their own forward/backward.
- Every inbound tensor list is validated against our own parameters before use: the count
  and shapes must match, floating dtypes only (converted to ours), NaN/inf refused with
  ``NonFiniteError``, anything else wrong with ``BadRequestError``; kinds of another method
  are refused too (a group averages by one method).
- Gradients filed for a round are bounded: only rounds in ``[next, next + ROUND_WINDOW]``
  around our own step, one entry per sender per round, at most ``max_buffered`` entries in
  all (the farthest future round is evicted first, so a flood of future rounds cannot push
  out the current round's).
- A failing, slow or vanished peer is dropped from the round: one call never holds the
  training step longer than ``config.timeout`` (plus a poll interval), and a peer's fault is
  counted in ``stats()``, never raised into the training loop.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from volunteer.client.averaging.group import MAX_ROUND, AveragingGroup, Exchange
from volunteer.client.averaging.methods import (
    AveragingConfig,
    average_into_,
    checked,
    divergence,
    elastic_pull_,
    mean_,
)
from volunteer.wire.errors import (
    BadRequestError,
    DrainingError,
    OverloadedError,
    RemoteError,
    TooLargeError,
)

ROUND_WINDOW = 4  # rounds ahead of ours whose gradients we file
POLL_S = 0.05  # how often a waiting round re-reads the group's members
# A peer whose exchange failed as gone (unreachable, draining) is not picked again for this
# long: a killed member stays listed in the DHT until its entry expires, and every gossip
# aimed at it would be a wasted averaging step.
SHUN_S = 30.0
SHUN_CODES = ("unreachable", "draining")
# Every method also takes ``consensus`` exchanges: the end-of-run agreement of
# ``consensus.finish`` (a trainer leaving pulls its copy together with the others').
ACCEPTS = {"gradAllReduce": ("grads", "consensus"), "elasticGossip": ("elastic", "consensus"),
           "gossipingSgd": ("gossip_push", "gossip_pull", "consensus")}


def _snapshot(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().to("cpu", copy=True) for t in tensors]


class Averager:
    """Averages ``params`` with the other members of ``group`` by ``config.method``.
    ``CollaborativeOptimizer`` builds one; use it directly only to average parameters outside
    an optimizer (the daemon's expert replicas do).

    Args:
        params: the parameters to keep in agreement (the trainer's dense ones).
        group: the ``AveragingGroup`` (``SwarmGroup`` or ``LocalGroup``) of the members.
        config: ``AveragingConfig`` (method, period / prob, alpha, timeout); only
            gradAllReduce and the gossip methods use an averager.
        seed: seeds the choice of gossip partners (None: random).
        max_buffered: peers' gradient entries kept for gradAllReduce rounds (default 64);
            raise it for groups with more members than that.
        max_pending: inbound updates waiting for ``apply_pending()`` before more are
            answered ``overloaded`` (default 8).
        defer_inbound: True (default): peers' pulls and pushes are applied between our own
            steps (``apply_pending``), never during a forward/backward; False applies them
            on arrival (only for parameters nothing else reads concurrently).
    """

    def __init__(self, params: list[torch.nn.Parameter], group: AveragingGroup,
                 config: AveragingConfig, *, seed: int | None = None,
                 max_buffered: int = 64, max_pending: int = 8,
                 defer_inbound: bool = True) -> None:
        if not config.uses_group:
            raise ValueError(f"method: {config.method!r} does not average; "
                             "use an Averager only for gradAllReduce or the gossip methods")
        if not params:
            raise ValueError("params: nothing to average; pass the trainer's dense parameters")
        self.params = list(params)
        self.group = group
        self.config = config
        self.lock = threading.RLock()
        self._rng = random.Random(seed)
        self._max_buffered = max(1, int(max_buffered))
        self._max_pending = max(1, int(max_pending))
        self._defer = bool(defer_inbound)
        self._pending: list[tuple[str, list[torch.Tensor], float]] = []  # (kind, theirs, alpha)
        self._cond = threading.Condition()
        self._grads: dict[int, dict[str, list[torch.Tensor]]] = {}  # round -> sender -> grads
        self._next_round = 0
        self._last_round_of: dict[str, int] = {}  # sender -> latest grads round it sent
        self._closed = False
        self._finishing = False  # set by consensus.finish: no more local steps
        self._shunned: dict[str, float] = {}  # peer -> monotonic time it may be picked again
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="averager")
        self._stats: dict[str, Any] = {
            "rounds": 0, "exchanges_ok": 0, "exchanges_failed": Counter(),
            "inbound_ok": 0, "inbound_refused": Counter(), "grads_dropped": 0,
            "last_divergence": None, "peers_in_last_round": 0}
        group.serve(self._handle)

    # ---- validation -------------------------------------------------------------------

    def _validate(self, tensors: Any) -> list[torch.Tensor]:
        """Peer tensors checked against our parameters (``methods.checked``)."""
        return checked(tensors, self.params)

    # ---- inbound ------------------------------------------------------------------------

    def _handle(self, sender: str, request: Exchange) -> list[torch.Tensor]:
        """The ``ExchangeHandler``: refuse what is not ours to take, else apply ``request``."""
        try:
            reply = self._apply(sender, request)
        except RemoteError as exc:
            with self._cond:
                self._stats["inbound_refused"][exc.code] += 1
            raise
        with self._cond:
            self._stats["inbound_ok"] += 1
        return reply

    def _apply(self, sender: str, request: Exchange) -> list[torch.Tensor]:
        if self._closed:
            raise DrainingError("this averager is closed")
        if request.kind not in ACCEPTS[self.config.method]:
            raise BadRequestError(f"this member averages by {self.config.method}, "
                                  f"not {request.kind!r} exchanges")
        if request.kind == "gossip_pull":
            if request.tensors:
                raise BadRequestError("a gossip_pull carries no tensors")
            with self.lock:
                return _snapshot(self.params)
        theirs = self._validate(request.tensors)
        if request.kind == "grads":
            self._file_grads(sender, request.round, theirs)
            return []
        alpha = {"gossip_push": 0.5, "consensus": min(request.alpha, 0.5)}.get(
            request.kind, min(request.alpha, self.config.alpha))
        with self.lock:
            reply = [] if request.kind == "gossip_push" else _snapshot(self.params)  # as we were
            if not self._defer or self._finishing:  # finishing: no step of ours runs
                self._update(request.kind, theirs, alpha)
                return reply
        with self._cond:
            if len(self._pending) >= self._max_pending:
                raise OverloadedError("too many averaging updates waiting; try later")
            self._pending.append((request.kind, theirs, alpha))
        return reply

    def _update(self, kind: str, theirs: list[torch.Tensor], alpha: float) -> None:
        """Apply one inbound update (caller holds ``lock``)."""
        if kind == "gossip_push":
            average_into_(self.params, theirs, alpha)
        else:  # elastic, consensus
            elastic_pull_(self.params, theirs, alpha)

    def apply_pending(self) -> int:
        """Apply the peers' waiting elastic pulls and gossip pushes, in arrival order, under
        ``lock``; call it between training steps. Returns how many were applied."""
        with self._cond:
            pending, self._pending = self._pending, []
        if pending:
            with self.lock:
                for kind, theirs, alpha in pending:
                    self._update(kind, theirs, alpha)
        return len(pending)

    def _file_grads(self, sender: str, round_: int, grads: list[torch.Tensor]) -> None:
        with self._cond:
            self._last_round_of[sender] = max(round_, self._last_round_of.get(sender, round_))
            if len(self._last_round_of) > 4 * self._max_buffered:  # forget stale senders
                self._last_round_of.pop(next(iter(self._last_round_of)))
            if not self._next_round <= round_ <= self._next_round + ROUND_WINDOW:
                self._stats["grads_dropped"] += 1
                return
            entries = sum(len(v) for v in self._grads.values())
            replacing = sender in self._grads.get(round_, {})
            if not replacing and entries >= self._max_buffered:
                farthest = max(self._grads)
                if farthest <= round_:
                    self._stats["grads_dropped"] += 1
                    raise TooLargeError("gradient buffer full; try later")
                victims = self._grads[farthest]
                victims.pop(next(iter(victims)))
                if not victims:
                    del self._grads[farthest]
                self._stats["grads_dropped"] += 1
            self._grads.setdefault(round_, {})[sender] = grads
            self._cond.notify_all()

    # ---- outbound -----------------------------------------------------------------------

    def _count_failure(self, exc: BaseException, peer: str | None = None) -> None:
        code = exc.code if isinstance(exc, RemoteError) else "internal"
        with self._cond:
            self._stats["exchanges_failed"][code] += 1
            if peer is not None and code in SHUN_CODES:
                self._shunned[peer] = time.monotonic() + SHUN_S

    def _members(self) -> list[str] | None:
        """The group's current members but us and the peers shunned as gone (``SHUN_S``);
        None (counted) if the group fails to say."""
        try:
            listed = [m for m in self.group.members() if m != self.group.me]
        except Exception as exc:  # the group's fault (a DHT lookup, say), not the trainer's
            self._count_failure(RemoteError(f"members: {exc}", code="members"))
            return None
        now = time.monotonic()
        with self._cond:
            self._shunned = {p: t for p, t in self._shunned.items() if t > now and p in listed}
            return [m for m in listed if m not in self._shunned]

    def _exchange(self, peer: str, request: Exchange, timeout: float) -> list[torch.Tensor] | None:
        """One exchange; None (counted) on any failure, never raised."""
        if timeout <= 0:
            self._count_failure(RemoteError("no time left in the round", code="timeout"))
            return None
        try:
            reply = self.group.exchange(peer, request, timeout)
        except Exception as exc:  # a peer's (or group's) fault stays here
            self._count_failure(exc, peer)
            return None
        with self._cond:
            self._stats["exchanges_ok"] += 1
        return reply

    def all_reduce_grads(self, step: int) -> int:
        """Average our gradients with every member's for round ``step`` into ``.grad``.

        Pushes ours to every member concurrently, then waits until every member's are here,
        or it failed, left, or is clearly in another round, or ``config.timeout`` passed.
        Returns how many peers' gradients were averaged in."""
        if self._closed:
            return 0
        step = min(max(int(step), 0), MAX_ROUND)
        deadline = time.monotonic() + self.config.timeout
        sent = [p.grad.detach().to("cpu", copy=True) if p.grad is not None
                else torch.zeros(p.shape, dtype=p.dtype) for p in self.params]
        with self._cond:
            self._next_round = step
            for old in [r for r in self._grads if r < step]:
                del self._grads[old]
        expected = set(self._members() or ())
        failed: set[str] = set()

        def push(peer: str) -> None:
            ok = self._exchange(peer, Exchange("grads", step, sent), deadline - time.monotonic())
            if ok is None:
                with self._cond:
                    failed.add(peer)
                    self._cond.notify_all()

        for peer in expected:
            try:
                self._pool.submit(push, peer)
            except RuntimeError:  # closed meanwhile
                failed.add(peer)
        next_poll = time.monotonic() + POLL_S
        with self._cond:
            while True:
                arrived = set(self._grads.get(step, {}))
                pending = {p for p in expected - arrived - failed
                           if not self._elsewhere(p, step)}
                now = time.monotonic()
                if not pending or now >= deadline:
                    break
                if now >= next_poll:  # a member that left will not send
                    self._cond.release()
                    try:
                        live = self._members()
                    finally:
                        self._cond.acquire()
                    if live is not None:  # a failed lookup changes nothing
                        expected &= set(live)
                    next_poll = now + POLL_S
                self._cond.wait(timeout=max(0.0, min(deadline, next_poll) - now))
            arrivals = self._grads.pop(step, {})
            arrivals.pop(self.group.me, None)
            self._next_round = step + 1
            self._stats["rounds"] += 1
            self._stats["peers_in_last_round"] = len(arrivals)
        if not arrivals:
            return 0
        # summed in peer-id order, so every member of a full round gets bit-identical means
        ordered = [g for _, g in sorted([*arrivals.items(), (self.group.me, sent)])]
        total = [t.clone() for t in ordered[0]]
        mean_(total, ordered[1:])
        with self.lock:
            for p, g in zip(self.params, total, strict=True):
                if p.grad is not None:
                    p.grad.copy_(g)
                elif bool(g.any()):
                    p.grad = g.to(p.device)
        return len(arrivals)

    def _elsewhere(self, peer: str, step: int) -> bool:
        """Whether ``peer``'s last gradients were for a round too far from ``step`` for it
        to send ``step``'s in time. Two rounds ahead: it finished a round without ours, so it
        timed out on us and sent ``step``'s long ago (one ahead is the normal lockstep race:
        its push for ``step`` may still be in flight)."""
        last = self._last_round_of.get(peer)
        return last is not None and (last > step + 1 or last < step - ROUND_WINDOW)

    def gossip(self, step: int) -> str | None:
        """One elastic or gossip exchange with a random member (per ``config``); the peer,
        or None when there was none or it failed."""
        members = self._members()
        if not members or self._closed:
            return None
        peer = self._rng.choice(sorted(members))
        cfg = self.config
        if cfg.method == "gossipingSgd" and cfg.gossip == "pull":
            kind = "gossip_pull"
        else:
            kind = "elastic" if cfg.method == "elasticGossip" else "gossip_push"
        return peer if self.pull(peer, kind, step, cfg.alpha, cfg.timeout) is not None else None

    def pull(self, peer: str, kind: str, step: int, alpha: float, timeout: float) -> float | None:
        """One parameter exchange of ``kind`` (elastic, consensus, gossip_push, gossip_pull)
        with ``peer``, applied to ours: the divergence between the copies before it (0.0 for
        a push, which learns nothing back), or None when it failed (counted)."""
        step = min(max(int(step), 0), MAX_ROUND)
        if kind == "gossip_pull":
            request = Exchange(kind, step, [])
        else:
            with self.lock:
                mine = _snapshot(self.params)
            request = Exchange(kind, step, mine, alpha)
        reply = self._exchange(peer, request, timeout)
        if reply is None:
            return None
        with self._cond:
            self._stats["rounds"] += 1
            self._stats["peers_in_last_round"] = 1
        if kind == "gossip_push":
            return 0.0
        try:
            theirs = self._validate(reply)
        except RemoteError as exc:
            self._count_failure(RemoteError(str(exc), code="bad_reply"))
            return None
        with self.lock:
            div = divergence(self.params, theirs)
            if kind == "gossip_pull":
                average_into_(self.params, theirs, 0.5)
            else:
                elastic_pull_(self.params, theirs, alpha)
        with self._cond:
            self._stats["last_divergence"] = div if math.isfinite(div) else None
        return div

    def members_to_average(self) -> list[str]:
        """The members an exchange may go to now (shunned ones left out; [] on a failed
        lookup)."""
        return self._members() or []

    def begin_finish(self) -> None:
        """No local step follows: apply waiting updates, and apply peers' from now on at
        once (``consensus.finish`` calls it)."""
        self.apply_pending()
        with self.lock:
            self._finishing = True
        self.apply_pending()

    # ---- the rest -----------------------------------------------------------------------

    def buffered(self) -> int:
        """How many peers' gradient lists are filed (bounded by ``max_buffered``)."""
        with self._cond:
            return sum(len(v) for v in self._grads.values())

    def stats(self) -> dict[str, Any]:
        """Counters: rounds, exchanges_ok, exchanges_failed (by error code), inbound_ok,
        inbound_refused (by code), grads_dropped, last_divergence, peers_in_last_round."""
        with self._cond:
            out = dict(self._stats)
            out["exchanges_failed"] = dict(self._stats["exchanges_failed"])
            out["inbound_refused"] = dict(self._stats["inbound_refused"])
            return out

    def close(self) -> None:
        """Stop averaging: inbound exchanges are refused (draining), queued pushes are
        dropped, and pushes already on their way are waited for (each is bounded by
        ``config.timeout``), so no thread of ours touches the group after ``close``."""
        self._closed = True
        with self._cond:
            self._grads.clear()
            self._pending.clear()
            self._cond.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)

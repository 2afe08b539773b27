"""``ReplicaSync``: volunteers that host the same expert uid keep one expert between them.

Two volunteers that serve one uid train their copies apart: each applies the gradients of the
trainers that chose it. Every ``averaging.replica_period_s`` (manifest; 0: off) this node runs,
for each uid it hosts, one *elastic exchange* (the Elastic Gossip thesis's pull, the
``elasticGossip`` method trainers use) with a random other live holder of that uid: it sends
its weights, the holder answers with its own as they were and moves ``replica_alpha`` of the
way towards ours, and we move ``replica_alpha`` of the way towards its answer (0.5: both end
at their mean). The machinery is the trainers' own: ``Averager`` (validation, the pull, its
counters) over a ``SwarmGroup`` named after the uid, whose bytes travel on the node's
``/volunteer/averaging/1.0.0`` channel (``NetworkService.open_channel``: libp2p streams,
relayed or hole-punched where needed, the expert RPC's bounds).

Who the replicas are: the other holders the DHT lists for the uid (signed records, filtered by
the experiment's admission policy; read with ``ShardNetwork.holders`` at the start of every
round, as ``SwarmView`` reads them for the shard decisions). Only ``serving`` holders are
chosen; an inbound exchange is answered only for a uid this node hosts, from a peer that the
last read lists as a holder of it (``overloaded``, "try later", otherwise: a newcomer is known
after our next read), and at most once per ``period / 2`` per (uid, peer), so one peer cannot
drag an expert to its weights by asking fast. Tensors must match the expert's parameters
(count, shapes) and be finite (``BadRequestError`` / ``NonFiniteError``), checked by the
averaging wire and again by ``Averager``.

The lock: the runtime's ``exclusive()`` (``volunteer.runtime.runtime.Runtime``) pauses batch
execution, so the optimizer never steps while a pull changes the weights, and a weight copy
is consistent. It is taken only around the copy and the pull, never across the network.
Weights are changed through their ``.data`` aliases, as the optimizer steps them
(``volunteer.experts.backend``): a forward graph cached for a later backward stays valid.
Each pull adds one to the backend's ``weights_revision`` (its weights changed, its
``updates_applied`` did not), for whoever decides whether a checkpoint or shard is stale.

Nothing here blocks serving: rounds run in their own thread ("volunteer-replicas"); every
exchange is bounded by ``exchange_timeout(nbytes)``; inbound exchanges run in the
``ExchangeServer``'s small worker pool, never in the network loop. ``status()`` is the
``replicas`` section of ``volunteer status --json``: per hosted uid, the replicas (peer ids),
the last divergence (relative L2 distance before the pull), exchanges ok / failed, inbound
answered / refused, and when the last exchange completed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from volunteer.client.averaging.averager import Averager
from volunteer.client.averaging.group import AveragingGroup, Exchange, ExchangeHandler
from volunteer.client.averaging.methods import AveragingConfig
from volunteer.daemon.swarm_view import SwarmView
from volunteer.wire.errors import DrainingError, OverloadedError, RemoteError

log = logging.getLogger(__name__)

EXCHANGE_BASE_S = 10.0
EXCHANGE_MIN_RATE = 1 << 20  # bytes/s both ways must sustain (a relayed path does ~2-10 MiB/s)
EXCHANGE_MAX_S = 600.0
MIN_INBOUND_GAP = 0.5  # of the period: per (uid, peer), inbound exchanges at most this often
JITTER = 0.2
# A node whose uids have no other holder backs off its DHT reads (1, 2, 4, 8 periods apart):
# with replication 1 most never have one, and a read per uid every period was, by the DHT
# counters of a 24-daemon swarm at rest, roughly a quarter of its DHT messages (an estimate
# from message rates, not a separate measurement). A new hosted uid resets it; a replica
# that finds us meanwhile averages with us from its side.
MAX_IDLE_BACKOFF = 8

Lookup = Callable[[Sequence[str]], Mapping[str, Sequence[Any]]]  # uids -> uid -> ServerEntry list
# make_group(uid, members) -> the group of that uid; members() lists (peer id, addrs)
GroupFactory = Callable[[str, Callable[[], list[tuple[str, list[str]]]]], AveragingGroup]


def exchange_timeout(nbytes: int) -> float:
    """Seconds one exchange of ``nbytes`` of weights may take (sent and answered)."""
    return min(EXCHANGE_MAX_S, EXCHANGE_BASE_S + 2 * max(0, nbytes) / EXCHANGE_MIN_RATE)


def weight_aliases(backend: Any) -> list[torch.Tensor]:
    """The expert's trainable parameters as ``.data`` aliases (see module docstring)."""
    return [p.data for p in backend.module.parameters() if p.requires_grad]


class ExclusiveLock:
    """``runtime.exclusive()`` in the shape of a lock (what ``Averager.lock`` is used as)."""

    def __init__(self, exclusive: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
        self._exclusive = exclusive
        self._local = threading.local()

    def __enter__(self) -> None:
        cm = self._exclusive()
        cm.__enter__()
        self._local.__dict__.setdefault("held", []).append(cm)

    def __exit__(self, *exc: Any) -> None:
        self._local.held.pop().__exit__(*exc)


@dataclass
class _Replica:
    """One hosted uid's averaging state."""

    uid: str
    backend: Any
    averager: Averager
    group: AveragingGroup
    exchanges_ok: int = 0
    last_exchange_at: float | None = None
    last_peer: str | None = None
    inbound_at: dict[str, float] = field(default_factory=dict)
    refused: Counter[str] = field(default_factory=Counter)  # inbound, by this node's rules


class _ReplicaGroup:
    """The uid's group with this node's rules on inbound exchanges (see module docstring)."""

    def __init__(self, inner: AveragingGroup, uid: str, sync: ReplicaSync) -> None:
        self.inner = inner
        self.uid = uid
        self.sync = sync

    @property
    def me(self) -> str:
        return self.inner.me

    def members(self) -> list[str]:
        return self.inner.members()

    def serve(self, handler: ExchangeHandler) -> None:
        def guarded(sender: str, request: Exchange) -> list[torch.Tensor]:
            try:
                self.sync._admit(self.uid, sender)
            except RemoteError as exc:
                self.sync._count_refusal(self.uid, exc.code)
                raise
            answer = handler(sender, request)
            self.sync._moved(self.uid)
            return answer

        self.inner.serve(guarded)

    def exchange(self, peer: str, request: Exchange, timeout: float) -> list[torch.Tensor]:
        return self.inner.exchange(peer, request, timeout)

    def close(self) -> None:
        self.inner.close()


class ReplicaSync:
    """Elastic averaging between the replicas of every hosted uid (see module docstring)."""

    def __init__(self, me: str, hosted: Callable[[], Mapping[str, Any]],
                 exclusive: Callable[[], contextlib.AbstractContextManager[Any]], lookup: Lookup,
                 make_group: GroupFactory, period_s: float, alpha: float, *,
                 seed: int | None = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 on_stop: Callable[[], None] | None = None) -> None:
        """``hosted()``: uid -> backend (the runtime's); ``exclusive``: the runtime's pause;
        ``lookup``: the DHT's holders of some uids; ``make_group``: the uid's group;
        ``on_stop``: called once by ``stop`` after the groups closed (e.g. the server's close)."""
        if not period_s > 0 or not 0 < alpha <= 1:
            raise ValueError("ReplicaSync: period_s must be > 0 and alpha in (0, 1]")
        self.me = me
        self.hosted = hosted
        self.lock = ExclusiveLock(exclusive)
        self.lookup = lookup
        self.make_group = make_group
        self.period_s = float(period_s)
        self.alpha = float(alpha)
        self._rng = random.Random(seed)
        self._clock = clock
        self._wall = wall
        self._mutex = threading.Lock()  # the fields below (sync thread, handler threads, status)
        self._replicas: dict[str, _Replica] = {}
        self._serving: dict[str, dict[str, list[str]]] = {}  # uid -> serving holder -> addrs
        self._known: dict[str, set[str]] = {}  # uid -> every live holder (serving or draining)
        self.rounds = 0
        self._backoff = 1
        self._last_hosted: frozenset[str] = frozenset()
        self.lookup_errors = 0
        self.last_round_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_stop = on_stop

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> ReplicaSync:
        """Run rounds every ``period_s`` (±20 %) in a thread of their own."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="volunteer-replicas", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        delay = self.period_s * self._rng.uniform(JITTER, 1.0)  # nodes started together spread out
        while not self._stop.wait(delay):
            try:
                self.round()
            except Exception:  # a bug must not end replica averaging for good
                log.exception("replica averaging round failed")
            delay = self.period_s * self._rng.uniform(1 - JITTER, 1 + JITTER) * self.next_backoff()

    def next_backoff(self) -> int:
        """Periods until the next round: 1 while some hosted uid has a serving replica or the
        hosted set just changed, else twice the last, up to ``MAX_IDLE_BACKOFF``."""
        with self._mutex:
            hosted = frozenset(self._known)
            alone = not any(self._serving.values()) and hosted == self._last_hosted
            self._last_hosted = hosted
            self._backoff = min(self._backoff * 2, MAX_IDLE_BACKOFF) if alone else 1
            return self._backoff

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the rounds and refuse inbound exchanges (``draining``); idempotent. Waits at
        most ``timeout`` s for an exchange in flight (it is bounded anyway)."""
        self._stop.set()
        with self._mutex:
            replicas, self._replicas = list(self._replicas.values()), {}
            on_stop, self._on_stop = self._on_stop, None
        for r in replicas:
            self._close(r)
        if on_stop is not None:
            on_stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(max(0.0, timeout))

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------ one round
    def round(self) -> int:
        """Read the replicas, then one elastic exchange per hosted uid that has one; returns
        how many exchanges completed."""
        hosted = dict(self.hosted())
        self._refresh(sorted(hosted))
        self._sync_hosted(hosted)
        done = 0
        with self._mutex:
            replicas = [self._replicas[u] for u in sorted(self._replicas)]
        for r in replicas:
            if self._stop.is_set():
                break
            peer = r.averager.gossip(min(self.rounds, 2**62))
            if peer is not None:
                done += 1
                self._moved(r.uid)
                with self._mutex:
                    r.exchanges_ok += 1
                    r.last_exchange_at, r.last_peer = self._wall(), peer
        with self._mutex:
            self.rounds += 1
            self.last_round_at = self._wall()
        return done

    def _refresh(self, uids: list[str]) -> None:
        """Who else holds each uid, from the DHT (kept as it was when the read fails)."""
        if not uids:
            with self._mutex:
                self._serving, self._known = {}, {}
            return
        try:
            view = SwarmView(self.lookup(uids), self.me)
        except Exception as exc:
            self.lookup_errors += 1
            log.info("replica lookup failed (keeping the last view): %s", exc)
            return
        serving: dict[str, dict[str, list[str]]] = {}
        known: dict[str, set[str]] = {}
        for uid in uids:
            others = view.others(uid)
            known[uid] = {e.peer_id for e in others}
            serving[uid] = {e.peer_id: list(e.addrs) for e in others if e.state == "serving"}
        with self._mutex:
            self._serving, self._known = serving, known

    def _sync_hosted(self, hosted: Mapping[str, Any]) -> None:
        """An averager per hosted uid (new for a new backend); closed for uids gone."""
        with self._mutex:
            gone = [r for uid, r in self._replicas.items() if hosted.get(uid) is not r.backend]
            for r in gone:
                del self._replicas[r.uid]
        for r in gone:
            self._close(r)
        for uid, backend in hosted.items():
            with self._mutex:
                if uid in self._replicas or self._stop.is_set():
                    continue
            try:
                r = self._open(uid, backend)
            except Exception as exc:  # e.g. an expert without parameters: nothing to average
                log.info("not averaging %s: %s", uid, exc)
                continue
            with self._mutex:
                stopped = self._stop.is_set()
                if not stopped:
                    self._replicas[uid] = r
            if stopped:  # stop() ran meanwhile: it did not see this one
                self._close(r)

    def _open(self, uid: str, backend: Any) -> _Replica:
        params = weight_aliases(backend)
        nbytes = sum(p.numel() * p.element_size() for p in params)
        group = _ReplicaGroup(self.make_group(uid, lambda: self.members(uid)), uid, self)
        config = AveragingConfig("elasticGossip", alpha=self.alpha, timeout=exchange_timeout(nbytes))
        # inbound pulls applied in the handler, under the lock (no training loop here to
        # apply deferred ones between steps: the runtime's optimizer never waits on us)
        averager = Averager(params, group, config, seed=self._rng.getrandbits(32), defer_inbound=False)
        averager.lock = self.lock  # the runtime's pause, not a lock of its own (module docstring)
        return _Replica(uid, backend, averager, group)

    @staticmethod
    def _close(r: _Replica) -> None:
        r.averager.close()
        try:
            r.group.close()
        except Exception as exc:
            log.debug("closing the averaging group of %s failed: %r", r.uid, exc)

    # ------------------------------------------------------------------ membership
    def members(self, uid: str) -> list[tuple[str, list[str]]]:
        """The serving replicas of ``uid`` as last read: (peer id, addrs)."""
        with self._mutex:
            return [(p, list(a)) for p, a in sorted(self._serving.get(uid, {}).items())]

    def _admit(self, uid: str, sender: str) -> None:
        """Raise unless ``sender`` may run an exchange on ``uid`` now (module docstring)."""
        if self._stop.is_set():
            raise DrainingError("this node is leaving: replica averaging stopped")
        now = self._clock()
        with self._mutex:
            r = self._replicas.get(uid)
            if r is None:
                raise OverloadedError(f"{uid} is not averaged here (yet); try later")
            if sender not in self._known.get(uid, ()):
                raise OverloadedError(f"{sender[-8:]} is not a known holder of {uid} here yet; try later")
            last = r.inbound_at.get(sender)
            if last is not None and now - last < MIN_INBOUND_GAP * self.period_s:
                raise OverloadedError(f"{uid} was averaged with {sender[-8:]} {now - last:.1f} s ago; "
                                      "try later")
            r.inbound_at = {p: t for p, t in r.inbound_at.items() if p in self._known.get(uid, ())}
            r.inbound_at[sender] = now

    def _moved(self, uid: str) -> None:
        """Count a pull on the backend's ``weights_revision``: its weights changed without an
        optimizer step, so ``updates_applied`` alone does not say a checkpoint or shard is
        stale."""
        with self._mutex:
            r = self._replicas.get(uid)
            if r is not None:
                r.backend.weights_revision = int(getattr(r.backend, "weights_revision", 0)) + 1

    def _count_refusal(self, uid: str, code: str) -> None:
        with self._mutex:
            r = self._replicas.get(uid)
            if r is not None:
                r.refused[code] += 1

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        """The ``replicas`` section of the status snapshot (see module docstring)."""
        now = self._wall()
        with self._mutex:
            replicas = dict(self._replicas)
            refused = {u: Counter(r.refused) for u, r in replicas.items()}
            serving = {u: sorted(p) for u, p in self._serving.items()}
            rounds, last_round = self.rounds, self.last_round_at
        uids: dict[str, Any] = {}
        for uid, r in sorted(replicas.items()):
            st = r.averager.stats()
            failed = st.get("exchanges_failed") or {}
            div = st.get("last_divergence")
            uids[uid] = {
                "replicas": serving.get(uid, []),
                "replica_count": len(serving.get(uid, [])),
                "last_divergence": div if isinstance(div, float) and math.isfinite(div) else None,
                "exchanges_ok": r.exchanges_ok,
                "exchanges_failed": int(sum(failed.values())),
                "failures": dict(failed),
                "inbound_ok": int(st.get("inbound_ok", 0)),
                "inbound_refused": dict(refused[uid] + Counter(st.get("inbound_refused") or {})),
                "last_exchange_at": r.last_exchange_at,
                "last_exchange_age_s": None if r.last_exchange_at is None
                else round(max(0.0, now - r.last_exchange_at), 1),
                "last_peer": r.last_peer,
            }
        return {"enabled": not self._stop.is_set(), "period_s": self.period_s, "alpha": self.alpha,
                "rounds": rounds, "last_round_at": last_round, "lookup_errors": self.lookup_errors,
                "uids": uids}


def start_replicas(sup: Any) -> ReplicaSync | None:
    """The supervisor's replica averaging, started; None without a peer network or with
    ``averaging.replica_period_s: 0``. Opens the averaging channel on the node's host (its
    in-flight bytes bounded by the node's ``serving.max_queued_bytes``, at most one wire
    message's maximum) and one ``ExchangeServer`` on it; ``stop()`` closes both sides."""
    av = sup.manifest.averaging
    if sup.network is None or not av.replicas_enabled:
        return None
    from volunteer.client.averaging.swarm_group import ExchangeServer, SwarmGroup
    from volunteer.client.averaging.wire import AVERAGING_LIMITS, PROTOCOL
    from volunteer.net.protocol_channel import ChannelLimits

    budget = min(int(sup.runtime.limits.max_queued_bytes), AVERAGING_LIMITS.max_bytes)
    channel = sup.network.open_channel(PROTOCOL, ChannelLimits(AVERAGING_LIMITS, AVERAGING_LIMITS,
                                                               max_inflight_bytes=budget))
    server = ExchangeServer(channel)
    me = sup.network.peer_id
    runtime, shards = sup.runtime, sup.network.shards
    sync = ReplicaSync(me, lambda: runtime.backends, runtime.exclusive, shards.holders,
                       lambda uid, members: SwarmGroup(server, channel, uid, me, members),
                       av.replica_period_s, av.replica_alpha, on_stop=server.close)
    log.info("replica averaging: every %gs with alpha %g", av.replica_period_s, av.replica_alpha)
    return sync.start()

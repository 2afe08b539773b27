"""Who is in an averaging group: signed DHT entries under an experiment-scoped prefix.

A member announces itself as the child ``m`` of the prefix ``_avg.<run_id>.`` (any prefix
of dot-terminated ``[A-Za-z0-9_-]`` components) through its own ``ExpertRegistry``: the
same signed, bounded, expiring entries as expert records, with its addresses (relay circuit
addresses included when it is behind a NAT) and, in a closed experiment, its admission
token. Readers use ``ExpertRegistry.lookup(prefix, admit)``, so the experiment's
``AdmissionPolicy`` applies to averaging groups exactly as to expert records: a stranger
without a token is never listed, however validly it signs. A withdrawn member (its
tombstone outlives its last entry) and an expired one are not listed either.

``DhtMembership`` is the ``SwarmGroup``'s members provider:

- ``start()`` publishes the entry once (waiting for it), then refreshes it every
  ``ttl / 3`` s in the node's loop; ``close()`` stops that and withdraws it (bounded).
- Calling it returns ``[(peer_id, addrs)]`` from a cache of at most ``cache_s`` seconds.
  Only the very first call waits for a DHT lookup (``lookup_timeout``); afterwards a stale
  cache is returned at once and a refresh starts in the loop, so a training step never waits
  on the DHT. A failed lookup keeps the last list (and is counted).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence

import trio

from volunteer.net import record_fields, records
from volunteer.net.registry import ExpertRegistry
from volunteer.net.trio_thread import TrioThread, TrioThreadError

log = logging.getLogger(__name__)

MEMBER_CHILD = "m"
RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CACHE_S = 2.0
LOOKUP_TIMEOUT = 10.0
WITHDRAW_TIMEOUT = 3.0


def group_prefix(run_id: str) -> str:
    """The DHT prefix of one run's averaging group (``_avg.<run_id>.``)."""
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
        raise ValueError("run_id must be 1-64 characters of [A-Za-z0-9_-]")
    return f"_avg.{run_id}."


class DhtMembership:
    """Announce this member under ``prefix`` and list the admitted members (see module
    docstring). ``thread``: the node's trio thread (DHT calls run there); ``registry`` is
    this member's own (its ttl and admission token are used); ``addrs`` and
    ``reachability`` are called in the loop at every publish. ``admit``: the experiment's
    admission filter (None: everyone); ``cache_s``: seconds a member list is reused before
    the DHT is read again (lower it for faster joins, raise it for less DHT traffic);
    ``lookup_timeout``: seconds a DHT read may take (an expired one keeps the last list)."""

    def __init__(self, thread: TrioThread, registry: ExpertRegistry, prefix: str, *,
                 addrs: Callable[[], Sequence[str]],
                 reachability: Callable[[], str] = lambda: "unknown",
                 admit: records.Admit | None = None, cache_s: float = CACHE_S,
                 lookup_timeout: float = LOOKUP_TIMEOUT) -> None:
        record_fields.check_prefix(prefix)
        if not prefix:
            raise ValueError("an averaging group needs a non-empty prefix")
        self.thread = thread
        self.registry = registry
        self.prefix = prefix
        self.uid = prefix + MEMBER_CHILD
        self.admit = admit
        self.cache_s = cache_s
        self.lookup_timeout = lookup_timeout
        self.refresh_s = registry.ttl / 3
        self._addrs = addrs
        self._reachability = reachability
        self._lock = threading.Lock()
        self._members: list[tuple[str, list[str]]] = []
        self._looked_at: float | None = None
        self._refreshing = False
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self.publishes = 0
        self.lookup_failures = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self, nursery: trio.Nursery) -> DhtMembership:
        """Publish once (bounded by ``lookup_timeout``), then keep the entry fresh in
        ``nursery`` (the node's). Raises ``TrioThreadError`` if the loop is not running."""
        self.thread.call(self._start, nursery)
        return self

    async def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        with trio.move_on_after(self.lookup_timeout):
            await self._publish()
        nursery.start_soon(self._keep_fresh)

    async def _keep_fresh(self) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            while True:
                await trio.sleep(self.refresh_s)
                with trio.move_on_after(self.lookup_timeout):
                    await self._publish()

    async def _publish(self) -> None:
        try:
            report = await self.registry.announce(
                [self.uid], addrs=list(self._addrs())[: records.MAX_ADDRS],
                reachability=self._reachability())
            self.publishes += 1
            if not report.ok:
                log.info("averaging membership %s stored by no DHT server yet", self.prefix)
        except Exception as e:  # the DHT's faults must not end the refresher
            log.warning("averaging membership %s: publish failed: %r", self.prefix, e)

    def close(self) -> None:
        """Stop refreshing and withdraw the entry (bounded; idempotent; quiet if stopped)."""
        try:
            self.thread.call(self._close)
        except TrioThreadError:
            pass

    async def _close(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        self._scope = None
        if self.publishes:  # withdraw only what was announced
            with trio.move_on_after(WITHDRAW_TIMEOUT):
                await self.registry.announce([], state="draining",
                                             addrs=list(self._addrs())[: records.MAX_ADDRS])

    # ------------------------------------------------------------------ members
    def __call__(self) -> list[tuple[str, list[str]]]:
        """Admitted live members (this one included) as ``(peer_id, addrs)``."""
        with self._lock:
            looked_at, members = self._looked_at, list(self._members)
            stale = looked_at is None or time.monotonic() - looked_at > self.cache_s
            start_refresh = stale and looked_at is not None and not self._refreshing
            if start_refresh:
                self._refreshing = True
        if looked_at is None:
            return self.refresh()
        if start_refresh:
            try:
                self.thread.call_soon(self._spawn_refresh)
            except TrioThreadError:
                with self._lock:
                    self._refreshing = False
        return members

    def refresh(self) -> list[tuple[str, list[str]]]:
        """Look the members up now (waits up to ``lookup_timeout``)."""
        try:
            self.thread.call(self._lookup)
        except TrioThreadError:
            pass
        with self._lock:
            return list(self._members)

    def _spawn_refresh(self) -> None:
        """In the loop: start a background lookup (never raise here: a callback's exception
        would end the loop)."""
        try:
            if self._nursery is None:
                raise RuntimeError("not started")
            self._nursery.start_soon(self._lookup)
        except RuntimeError:  # not started, or the node is stopping (nursery closed)
            with self._lock:
                self._refreshing = False

    async def _lookup(self) -> None:
        found: list[tuple[str, list[str]]] | None = None
        try:
            with trio.move_on_after(self.lookup_timeout):
                entries = await self.registry.lookup(self.prefix, self.admit)
                found = sorted((e.peer_id, list(e.addrs)) for e in entries
                               if e.state == "serving" and MEMBER_CHILD in e.children)
        except Exception as e:  # malformed entries are dropped by the reader; this is the DHT
            log.info("averaging membership %s: lookup failed: %r", self.prefix, e)
        with self._lock:
            self._refreshing = False
            if found is None:
                self.lookup_failures += 1
                if self._looked_at is None:
                    self._looked_at = time.monotonic()
            else:
                self._members = found
                self._looked_at = time.monotonic()

"""KadDHT plumbing for multi-writer registry values (py-libp2p 0.8.1).

What py-libp2p's KadDHT gives and why we wrap it (read in its source):

- One value per key, replaced when ``Validator.select`` prefers the newcomer, kept 24 h.
  Several servers must be able to announce under one key, so our DHT servers *merge*
  instead: ``MergingValueStore.put_record`` unions the stored and incoming values
  (freshest signed entry per peer, expired ones dropped, see ``records.merge_values``).
  ``RegistryValidator.select`` says "take it" whenever the newcomer carries anything
  fresher, and ``validate`` rejects any value with a forged, tampered, misfiled or
  malformed entry before it is stored.
- ``KadDHT.get_value`` returns a locally cached value first (stale reads) and keeps only
  the single best value among peers. ``lookup_value`` here instead asks the closest peers
  directly and unions the valid entries of every reply.
- ``KadDHT.put_value`` refuses to replace "newer" local values; ``publish_value`` merges
  locally and stores at the closest peers concurrently.

What one signer can make a DHT server store is bounded (strangers hold free keys): at most
``RecordPolicy.max_entries`` entries per key with a fair merge (entries held and alive win
over newcomers), at most ``max_keys_per_signer`` keys per signing peer, and at most
``max_store_bytes`` in all. A refused PUT raises ``StoreRefusedError`` inside the handler,
so the putter is not acknowledged; every refusal is counted in the policy's ``RecordStats``.
``configure_dht`` sets the policy (the experiment's TTL bound, the admission filter, the
stats) on a DHT that ``make_dht`` built.

All nodes of a swarm run this code, so the merge rule holds on every DHT server.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.common import format_time_rfc3339
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.kad_dht.value_store import ValueStore
from libp2p.records.record import make_signed_put_record
from libp2p.records.validator import NamespacedValidator, Validator

from volunteer.net import libp2p_adapter as lp
from volunteer.net import records
from volunteer.net.dht_routing import (
    cached_closest_peers,
    doubt_closest,
    forget_closest,
    sessions_of,
)
from volunteer.net.dht_rpc import DhtRequestError, DhtSessions, get_value, put_value

log = logging.getLogger(__name__)

QUERY_TIMEOUT = 3.0
IDENTIFY_WAIT = 10.0
# Each entry is stored at this many closest DHT servers and readers ask them all. Each
# request costs a fresh KAD stream (py-libp2p's server serves few at once, so idle streams
# are closed within a second): at 10 replicas a swarm's re-announces alone (each node, each
# key, every ttl/3 then) saturated 2 cores with 24 daemons. 5, as in hivemind's DHT; readers
# asking all of them tolerate writers whose view of the key's closest peers differs a little.
REPLICATION = 5
MAX_KEYS_PER_SIGNER = 1024  # keys of one DHT server that may hold entries of one signer
MAX_STORE_BYTES = 64 * 2**20  # registry values one DHT server holds, in all
_PREFIX = f"/{records.NAMESPACE}/".encode()
_UNCOUNTED = records.RecordStats()  # re-reads of what this node already holds


class RegistryValidator(Validator):
    """Validator for the ``/volunteer/`` namespace (see module docstring)."""

    def __init__(self, policy: records.RecordPolicy | None = None) -> None:
        self.policy = policy or records.RecordPolicy()

    def validate(self, key: str, value: bytes) -> None:
        p = self.policy
        records.check_value(key, value, max_ttl=p.max_ttl, admit=p.admit, stats=p.stats)

    def select(self, key: str, values: list[bytes]) -> int:
        # Called by DHT servers as select(key, [stored, incoming]): 1 = accept incoming,
        # which MergingValueStore then merges into the stored value.
        p = self.policy
        for i in range(1, len(values)):
            if records.has_news(values[0], values[i], key=key, max_ttl=p.max_ttl, admit=p.admit):
                return i
        return 0


class MergingValueStore(ValueStore):
    """ValueStore whose records under ``/volunteer/`` merge instead of replacing, within
    the bounds of the module docstring (entries per key, keys per signer, bytes)."""

    def __init__(self, host: IHost, local_peer_id: Any, *,
                 policy: records.RecordPolicy | None = None,
                 max_keys_per_signer: int = MAX_KEYS_PER_SIGNER,
                 max_store_bytes: int = MAX_STORE_BYTES) -> None:
        super().__init__(host=host, local_peer_id=local_peer_id)
        self.policy = policy or records.RecordPolicy()
        self.max_keys_per_signer = max_keys_per_signer
        self.max_store_bytes = max_store_bytes
        self._usage: dict[bytes, tuple[int, frozenset[str]]] = {}  # key -> (bytes, signers)
        self._per_signer: Counter[str] = Counter()
        self.bytes_stored = 0

    def put_record(self, key: bytes, record: Record) -> None:
        if not key.startswith(_PREFIX):
            super().put_record(key, record)
            return
        self.merge_in(key, record.value)

    def signer_keys(self, peer_id: str) -> int:
        """How many keys of this store hold an entry signed by ``peer_id``."""
        return self._per_signer[peer_id]

    def merge_in(self, key: bytes, value: bytes, now: float | None = None) -> bytes:
        """Merge ``value`` into the stored value for ``key``; return the stored result.

        Raises ``StoreRefusedError`` when none of the incoming entries was taken (invalid,
        expired, not admitted, key full, signer quota, store full, or only replays of older
        entries); its ``reason`` is the most frequent drop of this PUT. ``now``: for tests.
        """
        p, key_str = self.policy, key.decode()
        now = time.time() if now is None else now
        existing = self.get(key)
        held = records.valid_entries([existing.value if existing is not None else None],
                                     key=key_str, now=now, max_ttl=p.max_ttl, admit=p.admit,
                                     stats=_UNCOUNTED)
        drops = records.RecordStats()  # this PUT's drops: the reason of a refusal
        incoming = records.valid_entries([value], key=key_str, now=now, max_ttl=p.max_ttl,
                                         admit=p.admit, stats=drops)

        def may_add(entry: records.ServerEntry) -> bool:
            if self._per_signer[entry.peer_id] >= self.max_keys_per_signer:
                drops.count("signer_quota")
                return False
            return True

        merged = records.merge_entries(held, incoming, now=now, max_entries=p.max_entries,
                                       stats=drops, may_add=may_add)
        counts = drops.as_dict()
        for reason, n in counts.items():
            p.stats.count(reason, n)
        taken = any(merged.get(pid, (None, b""))[1] == blob for pid, (_e, blob) in incoming.items())
        if not merged:
            self.remove(key)
        if not taken:
            reason = max(counts, key=counts.__getitem__) if counts else "stale"
            raise records.StoreRefusedError("no incoming entry was stored", reason=reason)
        value_out = records.encode_value(blob for _pid, (_e, blob) in sorted(merged.items()))
        grow = len(value_out) - self._usage.get(key, (0, frozenset()))[0]
        if grow > 0 and self.bytes_stored + grow > self.max_store_bytes:
            p.stats.count("store_full")
            raise records.StoreRefusedError("the DHT store is full", reason="store_full")
        rec = Record()
        rec.key = key
        rec.value = value_out  # unsigned as a whole: each entry carries its own signature
        rec.timeReceived = format_time_rfc3339()
        self._evict_if_full()
        self.store[key] = (rec, max(e.expires for e, _b in merged.values()))
        self._account(key, len(value_out), frozenset(merged))
        return value_out

    def _account(self, key: bytes, size: int, signers: frozenset[str]) -> None:
        old_size, old_signers = self._usage.pop(key, (0, frozenset()))
        self.bytes_stored += size - old_size
        self._per_signer.subtract(old_signers)
        self._per_signer.update(signers)
        for pid in old_signers - signers:
            if self._per_signer[pid] <= 0:
                del self._per_signer[pid]
        if size:
            self._usage[key] = (size, signers)

    def remove(self, key: bytes) -> bool:
        self._account(key, 0, frozenset())
        return super().remove(key)

    def cleanup_expired(self) -> int:
        n = super().cleanup_expired()
        self._forget_gone()
        return n

    def _evict_if_full(self) -> None:
        super()._evict_if_full()
        self._forget_gone()

    def _forget_gone(self) -> None:
        """Keys the base class dropped without ``remove`` no longer count."""
        for key in [k for k in self._usage if k not in self.store]:
            self._account(key, 0, frozenset())


class RegistryDHT(KadDHT):
    """KadDHT that keeps DHT *clients* (trainers) out of its routing table.

    py-libp2p adds every peer that opens a KAD stream to it, skipping the server-mode
    check; a trainer in client mode then receives PUT/GET requests it cannot answer, and
    after it leaves every announce waits on it. Here a peer is added only when identify
    says it speaks the KAD protocol (or when we add it ourselves, e.g. a bootstrap peer).
    """

    _pending_checks: set | None = None

    def __init__(self, host: IHost, *args: Any, **kwargs: Any) -> None:
        super().__init__(host, *args, **kwargs)
        self.sessions = DhtSessions(host)

    async def run(self) -> None:
        self.manager.run_daemon_task(self.sessions.reap)
        await super().run()

    def _kad_support(self, peer_id: Any) -> bool | None:
        """True/False once identify told us the peer's protocols, None before."""
        try:
            protocols = self.host.get_peerstore().get_protocols(peer_id) or []
        except Exception:
            protocols = []
        return (str(KAD_PROTOCOL_ID) in protocols) if protocols else None

    async def add_peer(self, peer_id: Any, *, skip_server_mode_check: bool = False) -> bool:
        if skip_server_mode_check:  # inbound KAD stream: only server-mode peers
            kad = self._kad_support(peer_id)
            if kad is None:  # identify still running: decide when it is done
                pending = self._pending_checks = self._pending_checks or set()
                if peer_id not in pending and len(pending) < 256:
                    pending.add(peer_id)
                    self.manager.run_task(self._add_after_identify, peer_id)
                return False
            if not kad:
                return False
        return await super().add_peer(peer_id)

    async def _add_after_identify(self, peer_id: Any) -> None:
        try:
            with trio.move_on_after(IDENTIFY_WAIT):
                while (kad := self._kad_support(peer_id)) is None:
                    await trio.sleep(0.05)
                if kad:
                    await super().add_peer(peer_id)
        finally:
            if self._pending_checks is not None:
                self._pending_checks.discard(peer_id)


def make_dht(host: IHost, *, server: bool = True, policy: records.RecordPolicy | None = None,
             max_keys_per_signer: int = MAX_KEYS_PER_SIGNER,
             max_store_bytes: int = MAX_STORE_BYTES) -> KadDHT:
    """A KadDHT with the registry validator and merging value store installed.

    ``server=False`` for trainer-side client nodes (they query but hold no records).
    """
    policy = policy or records.RecordPolicy()
    registry_validator = RegistryValidator(policy)
    validator = NamespacedValidator({records.NAMESPACE: registry_validator})
    dht = RegistryDHT(
        host,
        DHTMode.SERVER if server else DHTMode.CLIENT,
        enable_random_walk=False,
        validator=validator,
        validator_changed=True,
    )
    lp.replace_value_store(dht, MergingValueStore(host=host, local_peer_id=host.get_id(), policy=policy,
                                                  max_keys_per_signer=max_keys_per_signer,
                                                  max_store_bytes=max_store_bytes))
    dht.registry_validator = registry_validator
    return dht


def configure_dht(dht: KadDHT, policy: records.RecordPolicy, *,
                  max_keys_per_signer: int | None = None,
                  max_store_bytes: int | None = None) -> None:
    """Apply ``policy`` (TTL bound, admission filter, stats) to a DHT from ``make_dht``:
    what its handlers accept on PUT and what ``publish_value``/``lookup_value`` read."""
    store = lp.value_store(dht)
    if not isinstance(store, MergingValueStore):
        raise TypeError("configure_dht needs a DHT built by make_dht")
    store.policy = policy
    if max_keys_per_signer is not None:
        store.max_keys_per_signer = max_keys_per_signer
    if max_store_bytes is not None:
        store.max_store_bytes = max_store_bytes
    validator = getattr(dht, "registry_validator", None)
    if isinstance(validator, RegistryValidator):
        validator.policy = policy


def policy_of(dht: KadDHT) -> records.RecordPolicy:
    """The record policy a DHT from ``make_dht`` applies (the default one otherwise)."""
    try:
        store = lp.value_store(dht)
    except lp.Libp2pInternalsError:  # not a KadDHT (a test double): nothing configured
        return records.RecordPolicy()
    return store.policy if isinstance(store, MergingValueStore) else records.RecordPolicy()


async def publish_value(dht: KadDHT, key: str, value: bytes) -> int:
    """Store ``value`` (one signed entry, usually) at the closest peers; return how many
    accepted it (the local store counts as one when this node is a DHT server)."""
    p = policy_of(dht)
    records.check_value(key, value, max_ttl=p.max_ttl, admit=p.admit, stats=p.stats)
    key_bytes = key.encode()
    stored = 0
    if lp.dht_is_server(dht):
        try:
            stored += lp.value_store(dht).merge_in(key_bytes, value) is not None
        except records.RecordError as e:
            log.debug("this node's store refused %s: %s", key, e)
    peers = (await cached_closest_peers(dht, key_bytes))[:REPLICATION]
    record = make_signed_put_record(key_bytes, value, dht.host.get_private_key())
    ok: list[bool] = []

    sessions = sessions_of(dht)

    async def store_one(peer: Any) -> None:
        done = False
        with trio.move_on_after(QUERY_TIMEOUT):
            done = await put_value(sessions, peer, key_bytes, value, record)
        ok.append(done)
        if not done:
            forget_closest(dht, key_bytes, peer)

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(store_one, peer)
    return stored + sum(ok)


async def lookup_value(dht: KadDHT, key: str, *, policy: records.RecordPolicy | None = None,
                       admit: records.Admit | None = None,
                       ) -> dict[str, tuple[records.ServerEntry, bytes]]:
    """Union of the valid live entries for ``key`` held by the closest peers (and by us).

    Entries are checked against ``policy`` (default: the DHT's own); ``admit``, when given,
    replaces the policy's admission filter. Malformed or refused entries are dropped and
    counted in the policy's stats, never raised.
    """
    p = policy or policy_of(dht)
    key_bytes = key.encode()
    values: list[bytes] = []
    local = lp.value_store(dht).get(key_bytes)
    if local is not None:
        values.append(local.value)
    peers = (await cached_closest_peers(dht, key_bytes))[:REPLICATION]

    sessions = sessions_of(dht)

    async def query_one(peer: Any) -> None:
        try:
            with trio.fail_after(QUERY_TIMEOUT):
                got = await get_value(sessions, peer, key_bytes)
        except (DhtRequestError, trio.TooSlowError):
            forget_closest(dht, key_bytes, peer)
            return
        if got is not None:
            values.append(got)

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(query_one, peer)
    if len(values) == (local is not None):  # no peer holds anything: check our view next time
        doubt_closest(dht, key_bytes)
    return records.valid_entries(values, key=key, max_ttl=p.max_ttl,
                                 admit=admit if admit is not None else p.admit, stats=p.stats)

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

All nodes of a swarm run this code, so the merge rule holds on every DHT server.
"""

from __future__ import annotations

import logging
import time
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

from volunteer.net import records
from volunteer.net.dht_routing import cached_closest_peers, forget_closest, sessions_of
from volunteer.net.dht_rpc import DhtRequestError, DhtSessions, get_value, put_value

log = logging.getLogger(__name__)

QUERY_TIMEOUT = 3.0
IDENTIFY_WAIT = 10.0
REPLICATION = 10  # each entry is stored at this many closest DHT servers
LOOKUP_FANOUT = 6  # readers ask this many of the closest (all hold every entry)
_PREFIX = f"/{records.NAMESPACE}/".encode()


class RegistryValidator(Validator):
    """Validator for the ``/volunteer/`` namespace (see module docstring)."""

    def validate(self, key: str, value: bytes) -> None:
        records.check_value(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        # Called by DHT servers as select(key, [stored, incoming]): 1 = accept incoming,
        # which MergingValueStore then merges into the stored value.
        for i in range(1, len(values)):
            if records.has_news(values[0], values[i], key=key):
                return i
        return 0


class MergingValueStore(ValueStore):
    """ValueStore whose records under ``/volunteer/`` merge instead of replacing."""

    def put_record(self, key: bytes, record: Record) -> None:
        if not key.startswith(_PREFIX):
            super().put_record(key, record)
            return
        self.merge_in(key, record.value)

    def merge_in(self, key: bytes, value: bytes) -> bytes | None:
        """Merge ``value`` into the stored value for ``key``; return the result (or None)."""
        key_str = key.decode()
        existing = self.get(key)
        values = [existing.value, value] if existing is not None else [value]
        merged = records.merge_values(values, key=key_str)
        if merged is None:
            self.remove(key)
            return None
        rec = Record()
        rec.key = key
        rec.value = merged  # unsigned as a whole: each entry carries its own signature
        rec.timeReceived = format_time_rfc3339()
        self._evict_if_full()
        self.store[key] = (rec, time.time() + records.MAX_TTL)
        return merged


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


def make_dht(host: IHost, *, server: bool = True) -> KadDHT:
    """A KadDHT with the registry validator and merging value store installed.

    ``server=False`` for trainer-side client nodes (they query but hold no records).
    """
    validator = NamespacedValidator({records.NAMESPACE: RegistryValidator()})
    dht = RegistryDHT(
        host,
        DHTMode.SERVER if server else DHTMode.CLIENT,
        enable_random_walk=False,
        validator=validator,
        validator_changed=True,
    )
    dht.value_store = MergingValueStore(host=host, local_peer_id=host.get_id())
    return dht


async def publish_value(dht: KadDHT, key: str, value: bytes) -> int:
    """Store ``value`` (one signed entry, usually) at the closest peers; return how many
    accepted it (the local store counts as one when this node is a DHT server)."""
    records.check_value(key, value)
    key_bytes = key.encode()
    stored = 0
    if dht.mode == DHTMode.SERVER and dht.value_store.merge_in(key_bytes, value) is not None:
        stored += 1
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
            forget_closest(dht, key_bytes)

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(store_one, peer)
    return stored + sum(ok)


async def lookup_value(dht: KadDHT, key: str) -> dict[str, tuple[records.ServerEntry, bytes]]:
    """Union of the valid live entries for ``key`` held by the closest peers (and by us)."""
    key_bytes = key.encode()
    values: list[bytes] = []
    local = dht.value_store.get(key_bytes)
    if local is not None:
        values.append(local.value)
    peers = (await cached_closest_peers(dht, key_bytes))[:LOOKUP_FANOUT]

    sessions = sessions_of(dht)

    async def query_one(peer: Any) -> None:
        try:
            with trio.fail_after(QUERY_TIMEOUT):
                got = await get_value(sessions, peer, key_bytes)
        except (DhtRequestError, trio.TooSlowError):
            forget_closest(dht, key_bytes)
            return
        if got is not None:
            values.append(got)

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(query_one, peer)
    return records.valid_entries(values, key=key)

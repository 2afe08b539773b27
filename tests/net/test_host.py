"""Identity persistence and host bootstrap on loopback."""

from __future__ import annotations

import os
import stat

import pytest
import trio

from tests.net.swarm_helpers import swarm, wait_for
from volunteer.net.host import (
    IDENTITY_FILE,
    IdentityError,
    load_or_create_identity,
    peer_id_of,
)


def test_identity_is_created_owner_only_and_reloaded(tmp_path):
    k1 = load_or_create_identity(tmp_path)
    path = tmp_path / IDENTITY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    k2 = load_or_create_identity(tmp_path)
    assert peer_id_of(k1) == peer_id_of(k2)
    assert peer_id_of(load_or_create_identity(tmp_path / "other")) != peer_id_of(k1)


def test_identity_rejects_permissive_or_malformed_file(tmp_path):
    load_or_create_identity(tmp_path)
    path = tmp_path / IDENTITY_FILE
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_identity(tmp_path)
    os.chmod(path, 0o600)
    path.write_bytes(b"short")
    with pytest.raises(IdentityError, match="malformed"):
        load_or_create_identity(tmp_path)


@pytest.mark.timeout(60)
def test_three_nodes_bootstrap_and_find_each_other(tmp_path):
    async def main():
        async with swarm(tmp_path, 3) as (a, b, c):
            # b and c only know a; the self-lookup during bootstrap makes them meet.
            await wait_for(lambda: b.dht.get_routing_table_size() >= 2
                           and c.dht.get_routing_table_size() >= 2)
            found = await c.dht.find_peer(b.peer_id)
            assert found is not None and found.peer_id == b.peer_id
            assert a.multiaddrs()[0].endswith(f"/p2p/{a.peer_id.to_base58()}")
            assert c.bootstrap_state.successes == 1

    trio.run(main)


@pytest.mark.timeout(60)
def test_rebootstraps_after_losing_every_peer(tmp_path):
    async def main():
        async with swarm(tmp_path, 2, watch_interval=0.1, backoff_initial=0.1) as (a, b):
            assert b.connected_peers() == [a.peer_id.to_base58()]
            await a.host.disconnect(b.peer_id)
            await wait_for(lambda: b.bootstrap_state.successes >= 2)
            await wait_for(lambda: a.peer_id.to_base58() in b.connected_peers())

    trio.run(main)

"""A DHT lookup that outlives ``lookup_timeout`` raises the typed ``RemoteTimeoutError``
(trio's TooSlowError escaped into training loops in the chaos bench)."""

from __future__ import annotations

import pytest
import trio

from volunteer.client.node import ClientNode
from volunteer.wire.errors import RemoteTimeoutError


@pytest.mark.timeout(60)
def test_a_lookup_past_its_deadline_is_a_typed_timeout():
    client = ClientNode("exp", [], listen_addrs=("/ip4/127.0.0.1/tcp/0",), lookup_timeout=0.2).start()
    try:
        async def never_answers(prefixes):
            await trio.sleep_forever()

        client.registry.children = never_answers  # a DHT that never answers
        with pytest.raises(RemoteTimeoutError, match=r"longer than 0\.2 s"):
            client.children(["moe."])
    finally:
        client.stop()

"""The KAD stream pool (``dht_rpc.DhtSessions``) stays consistent while it closes streams.

Every task of a node shares the pool: requests give streams back while ``close`` (run by
``SwarmNode.set_dht_server``) or ``reap`` awaits a stream's close. ``close`` iterated the
pool's dict across those awaits, and a stream given back to a new peer meanwhile raised
"dictionary changed size during iteration" out of ``NetworkService.start`` (a daemon
joining a 20-30 daemon swarm in scripts/bench_scale.py). ``reap`` overwrote a peer's list
with the copy it took before the await, losing streams given back meanwhile (never
closed, never reused). ``RpcClient.close`` walked its stream pools the same way.

The race is made deterministic: a stand-in stream's ``close`` gives a stream back to the
pool, as a concurrent request finishing at that moment does, before it yields.
"""

from __future__ import annotations

import time

import trio
from libp2p.peer.id import ID
from trio.testing import MockClock

from volunteer.net.dht_rpc import IDLE_CLOSE, DhtSessions


class _Stream:
    """Stand-in stream: ``close`` runs ``during_close`` (a concurrent give-back), then yields."""

    def __init__(self, name: str, during_close=None) -> None:
        self.name = name
        self.closed = False
        self.during_close = during_close

    async def close(self) -> None:
        if self.during_close is not None:
            self.during_close()
        await trio.lowlevel.checkpoint()
        self.closed = True


def _peer(i: int) -> ID:
    return ID(b"\x00\x24" + bytes([i]) * 34)


def _pooled(sessions: DhtSessions) -> dict[ID, list[str]]:
    return {p: [s.name for _t, s in idle] for p, idle in sessions._idle.items()}


def test_close_survives_a_stream_given_back_to_a_new_peer_meanwhile():
    sessions = DhtSessions(host=None)  # type: ignore[arg-type]
    late = _Stream("late")
    first = _Stream("a", during_close=lambda: sessions._give_back(_peer(9), late))
    others = [_Stream("b"), _Stream("c")]
    sessions._give_back(_peer(1), first)
    for i, s in enumerate(others, start=2):
        sessions._give_back(_peer(i), s)

    trio.run(sessions.close)  # raised RuntimeError: dictionary changed size during iteration

    assert first.closed and all(s.closed for s in others)
    # The stream given back while closing was not in the pool that was closed: it stays.
    assert _pooled(sessions) == {_peer(9): ["late"]} and not late.closed


class _SlowStream(_Stream):
    """A stream whose close takes ``IDLE_CLOSE * 0.4`` (mock clock), as a remote one may."""

    async def close(self) -> None:
        await trio.sleep(IDLE_CLOSE * 0.4)
        self.closed = True


def test_close_runs_alongside_the_reaper():
    """The daemon's case: the background reaper drops stale peers from the pool while
    ``close`` (a switch to DHT server mode at start) still walks it."""
    sessions = DhtSessions(host=None)  # type: ignore[arg-type]
    long_ago = time.monotonic() - 10 * IDLE_CLOSE
    streams = [_SlowStream(f"s{i}") for i in range(6)]
    for i, s in enumerate(streams):
        sessions._idle[_peer(i)] = [(long_ago, s)]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sessions.reap)
            await sessions.close()  # raised RuntimeError once the reaper popped a peer
            nursery.cancel_scope.cancel()

    trio.run(main, clock=MockClock(autojump_threshold=0))
    assert all(s.closed for s in streams) and sessions._idle == {}


def test_reap_keeps_streams_given_back_while_it_closes_stale_ones():
    sessions = DhtSessions(host=None)  # type: ignore[arg-type]
    fresh = _Stream("fresh")
    stale = _Stream("stale", during_close=lambda: sessions._give_back(_peer(1), fresh))
    kept = _Stream("kept")
    long_ago = time.monotonic() - 10 * IDLE_CLOSE
    sessions._idle[_peer(1)] = [(long_ago, stale)]
    sessions._idle[_peer(2)] = [(long_ago, _Stream("stale2")), (time.monotonic() + IDLE_CLOSE, kept)]

    async def one_pass() -> None:
        with trio.move_on_after(IDLE_CLOSE * 0.75):  # one reap round on the mock clock
            await sessions.reap()

    trio.run(one_pass, clock=MockClock(autojump_threshold=0))

    assert stale.closed and not fresh.closed and not kept.closed
    # peer 1's stream given back during the close was kept (the old reap overwrote it).
    assert _pooled(sessions) == {_peer(1): ["fresh"], _peer(2): ["kept"]}


def test_detach_stale_empties_peers_with_only_stale_streams():
    sessions = DhtSessions(host=None)  # type: ignore[arg-type]
    now = time.monotonic()
    old, new = _Stream("old"), _Stream("new")
    sessions._idle[_peer(1)] = [(now - IDLE_CLOSE, old)]
    sessions._idle[_peer(2)] = [(now - IDLE_CLOSE, _Stream("old2")), (now, new)]
    assert [s.name for s in sessions._detach_stale(now)] == ["old", "old2"]
    assert _pooled(sessions) == {_peer(2): ["new"]}


def test_rpc_client_close_survives_a_call_picking_a_stream_meanwhile():
    """``RpcClient.close`` had the same loop: a call for a new peer while a reset awaited."""
    from volunteer.net.rpc_calls import Channel
    from volunteer.net.rpc_client import RpcClient
    from volunteer.wire.limits import WireLimits

    client = RpcClient(None, None, WireLimits(), protocol="/test/1")  # type: ignore[arg-type]

    class _ResetStream:
        def __init__(self, during_reset=None) -> None:
            self.during_reset, self.was_reset = during_reset, False

        async def reset(self) -> None:
            if self.during_reset is not None:
                self.during_reset()
            await trio.lowlevel.checkpoint()
            self.was_reset = True

    late = Channel(_ResetStream())  # type: ignore[arg-type]
    first = _ResetStream(lambda: client._pools.setdefault(_peer(9), []).append(late))
    chans = [Channel(first), Channel(_ResetStream())]  # type: ignore[arg-type]
    for i, chan in enumerate(chans):
        client._pools[_peer(i)] = [chan]

    trio.run(client.close)

    assert all(c.broken and c.stream.was_reset for c in chans)
    assert client._pools == {_peer(9): [late]} and not late.broken

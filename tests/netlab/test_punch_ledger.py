"""Which direct connections count as hole-punched, and the retry of punches (no root needed).

The NAT-lab flake of issue 10: a punch often lands through the peer's retransmitted SYN
after our own DCUtR session ended, and the ledger used to call that connection ``direct``.
"""

from __future__ import annotations

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from volunteer.net.host import build_host
from volunteer.net.nat.connections import DIRECT, HOLE_PUNCHED, ConnectionLedger
from volunteer.net.nat.holepunch import PUNCH_AFTERGLOW_S, HolePuncher, SessionSet


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeConn:
    """A direct connection as the ledger sees it (no circuit address)."""

    def __init__(self, peer: str) -> None:
        self.muxed_conn = type("M", (), {"peer_id": FakePeer(peer)})()
        self._actual_transport_addresses: list[str] = ["/ip4/10.77.0.20/tcp/4001"]


class FakePeer(str):
    def to_base58(self) -> str:
        return str(self)


def test_a_connection_after_our_session_ended_is_still_hole_punched() -> None:
    clock = Clock()
    sessions = SessionSet(clock)
    ledger = ConnectionLedger(punching=sessions.punching)
    sessions.add("A")
    during = FakeConn("A")
    trio.run(ledger.connected, None, during)
    sessions.discard("A")  # our session gave up; the peer's SYN retry lands 3 s later
    clock.now += 3.0
    late = FakeConn("A")
    trio.run(ledger.connected, None, late)
    clock.now += PUNCH_AFTERGLOW_S
    much_later = FakeConn("A")
    trio.run(ledger.connected, None, much_later)
    never = FakeConn("B")  # no session with B ever
    trio.run(ledger.connected, None, never)
    assert [ledger.kind(c) for c in (during, late, much_later, never)] == [
        HOLE_PUNCHED, HOLE_PUNCHED, DIRECT, DIRECT]
    assert ledger.hole_punches == 2
    assert sessions.late == 1


def test_session_set_behaves_as_the_set_dcutr_expects_and_stays_bounded() -> None:
    clock = Clock()
    sessions = SessionSet(clock)
    sessions.add("A")
    assert "A" in sessions and sessions.punching("A")
    sessions.discard("A")
    sessions.discard("A")  # twice: no error, as with a set
    assert "A" not in sessions and sessions.punching("A")
    sessions.add("B")
    sessions.clear()
    assert not sessions and sessions.punching("B")
    for i in range(5000):
        sessions.add(i)
        sessions.discard(i)
    assert len(sessions.ended) <= 4096


def test_hole_puncher_installs_its_session_set_into_py_libp2p_dcutr() -> None:
    # Breaks when py-libp2p renames or retypes the attribute this module reaches into.
    puncher = HolePuncher(build_host(create_new_key_pair()))
    assert puncher.dcutr._in_progress is puncher.sessions
    assert isinstance(puncher.dcutr._hole_punch_attempts, dict)

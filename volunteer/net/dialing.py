"""Reach a peer by the addresses of its signed record: direct first, else through its relay.

One definition for the trainer's ``ClientNode`` and the volunteer's ``NetworkService`` (shard
downloads and hand-offs between volunteers take the same paths as expert calls):
``dial(host, nat, peer_id, addrs)`` opens a connection when none exists. With a running
``NatTraversal`` that has a relay client, ``NatTraversal.connect`` tries the direct addresses,
then the ``/p2p-circuit`` ones, and waits up to ``upgrade_timeout`` s for a DCUtR hole punch;
without one, only the direct addresses are dialled (py-libp2p's dialer skips circuits).

When a dial fails, ``dial_failure(exc, host, port, expected)`` says why in plain words
("connection refused at 127.0.0.1:4001", "timed out after 5 s at ...", "wrong peer id at
...: expected X, got Y"): py-libp2p nests the cause four or five errors deep.
``probe_bootstrap(addr)`` / ``probe_bootstraps(addrs)`` (sync; ``aprobe_*`` inside trio) dial
a bootstrap address from a throwaway host and return a ``ProbeResult``: the daemon logs it
when no bootstrap peer answered, and ``volunteer doctor`` checks the bootstrap peers with it.
"""

from __future__ import annotations

import errno
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

if TYPE_CHECKING:  # the NAT stack is imported by whoever builds a NatTraversal
    from volunteer.net.nat.traversal import NatTraversal


def full_addrs(peer_id: ID, addrs: Sequence[str]) -> list[str]:
    """Each address ending in ``/p2p/<peer id>`` (records may carry bare transport addresses)."""
    return [a if "/p2p/" in a else f"{a}/p2p/{peer_id.to_base58()}" for a in addrs]


def dialable(addrs: Sequence[str]) -> list[multiaddr.Multiaddr]:
    """Transport parts of the direct addresses (the swarm's dialer cannot use circuits)."""
    return [multiaddr.Multiaddr(a.split("/p2p/")[0]) for a in addrs if "/p2p-circuit" not in a]


async def dial(host: IHost, nat: NatTraversal | None, peer_id: ID, addrs: Sequence[str], *,
               timeout: float, upgrade_timeout: float) -> None:
    """Make sure a connection to ``peer_id`` exists (see module docstring); raises if none.

    ``nat``: the node's running ``NatTraversal``, or None (no NAT traversal, or not up yet).
    """
    full = full_addrs(peer_id, addrs)
    if nat is None or nat.relay_node is None:
        await host.connect(PeerInfo(peer_id, dialable(full)))
        return
    conn = await nat.connect(full, timeout=timeout, upgrade_timeout=upgrade_timeout)
    if conn is None:
        raise ConnectionError(f"no direct or relayed route to {peer_id}")


# ---------------------------------------------------------------- why a dial failed, in words
REFUSED, TIMED_OUT, UNREACHABLE, UNRESOLVED, WRONG_PEER, HANDSHAKE, BAD_ADDRESS, RECENT, OK = (
    "refused", "timed_out", "unreachable", "unresolved", "wrong_peer", "handshake", "bad_address", "recent",
    "ok")
_HOST_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")
_GOT_PEER = re.compile(r"remote_peer_id_from_pubkey=(\w+)|got (\w+)")
MAX_PROBES = 16


@dataclass(frozen=True)
class ProbeResult:
    """What dialling one peer address found (``probe_bootstrap``).

    ``kind`` is one of ``ok``, ``refused``, ``timed_out``, ``unreachable``, ``unresolved``,
    ``wrong_peer``, ``handshake`` (the peer answered but the secure handshake failed),
    ``recent`` (py-libp2p's dialer refused to retry a peer that failed moments ago) or
    ``bad_address``; ``problem`` the failure in plain words ("connection refused at
    127.0.0.1:4001", "wrong peer id: expected 12D3..., got 12D3..."), None when ``ok``;
    ``peer_id`` the peer that answered when the handshake told us; ``rtt_s`` how long the
    dial (TCP + secure handshake) took when it worked.
    """

    addr: str
    kind: str
    problem: str | None = None
    peer_id: str | None = None
    rtt_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.kind == OK


def split_peer_addr(addr: str) -> tuple[str, int, str]:
    """``/ip4|ip6|dns*/H/tcp/P/p2p/ID`` -> (H, P, ID); ValueError naming what is missing."""
    try:
        parsed = multiaddr.Multiaddr(addr)
        parts = {p.name: parsed.value_for_protocol(p.code) for p in parsed.protocols()}
    except Exception as exc:  # the multiaddr parser raises several unrelated types
        raise ValueError(f"{addr!r} is not a multiaddr ({exc})") from None
    host = next((parts[n] for n in _HOST_PROTOCOLS if n in parts), None)
    if host is None or parts.get("tcp") is None or not parts.get("p2p") or "p2p-circuit" in parts:
        raise ValueError(f"{addr!r}: expected /ip4/HOST/tcp/PORT/p2p/<peer id>")
    return str(host), int(parts["tcp"]), str(parts["p2p"])


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every error inside it: causes, contexts, trio exception groups and
    py-libp2p's ``MultiError.errors`` (its dial errors nest four or five deep)."""
    out: list[BaseException] = []
    stack = [exc]
    while stack and len(out) < 64:
        e = stack.pop()
        if any(e is seen for seen in out):
            continue
        out.append(e)
        stack.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        for attr in ("exceptions", "errors"):
            inner = getattr(e, attr, None)
            if isinstance(inner, (list, tuple)):
                stack.extend(x for x in inner if isinstance(x, BaseException))
    return out


def dial_failure(exc: BaseException, host: str, port: int, expected: str | None = None,
                 timeout: float | None = None, tcp_ok: bool = False) -> tuple[str, str, str | None]:
    """``(kind, plain words, answering peer id)`` for an exception from dialling
    ``host:port`` (a TCP connect, or py-libp2p's ``host.connect``); see ``ProbeResult``.
    ``tcp_ok``: a plain TCP connect to the address worked (a timeout is then the peer's)."""
    at = _where(host, port)
    chain = _chain(exc)
    for e in chain:
        text = str(e)
        if type(e).__name__ == "PeerIDMismatchesPubkey" or "Peer ID mismatch" in text:
            m = _GOT_PEER.search(text)
            got = next((g for g in m.groups() if g), None) if m else None
            return (WRONG_PEER, f"wrong peer id at {at}: expected {expected or '?'}, got {got or 'another'} "
                    "(the peer there restarted with a new identity, or the address is stale)", got)
    for e in chain:
        if isinstance(e, ConnectionRefusedError):
            return REFUSED, f"connection refused at {at} (nothing listens there)", None
        if isinstance(e, socket.gaierror):
            return UNRESOLVED, f"cannot resolve {host} ({e.strerror or e})", None
        if isinstance(e, (trio.TooSlowError, TimeoutError)):
            after = f" after {timeout:g} s" if timeout else ""
            why = ("the port accepts connections but no libp2p peer answers" if tcp_ok
                   else "a firewall drops the connection, or the host is down")
            return TIMED_OUT, f"timed out{after} at {at} ({why})", None
        if isinstance(e, OSError) and e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return UNREACHABLE, f"no route to {at} ({e.strerror})", None
    for e in chain:
        if isinstance(e, OSError) and e.strerror:
            return UNREACHABLE, f"{e.strerror} at {at}", None
    if any("negative cache" in str(e) for e in chain):
        return (RECENT, f"not dialled again yet at {at}: the last dial failed moments ago "
                "(py-libp2p waits before retrying a peer)", None)
    if any("handshake" in str(e).lower() or "negotiate" in str(e).lower() for e in chain):
        return HANDSHAKE, f"the peer at {at} answered but the secure handshake failed (not a volunteer node?)", None
    leaf = chain[-1] if chain else exc
    return HANDSHAKE, f"dial to {at} failed: {type(leaf).__name__}: {' '.join(str(leaf).split())[:200]}", None


def describe_dial_error(exc: BaseException, addrs: Sequence[str | multiaddr.Multiaddr], expected: str,
                        timeout: float | None = None) -> str:
    """``dial_failure``'s plain words for a failed ``host.connect`` to a peer at ``addrs`` (the
    first TCP address names the place), e.g. for the bootstrap loop's ``last_error``."""
    return classify_dial_error(exc, addrs, expected, timeout)[1]


def classify_dial_error(exc: BaseException, addrs: Sequence[str | multiaddr.Multiaddr], expected: str,
                        timeout: float | None = None) -> tuple[str, str]:
    """``(kind, plain words)`` of ``describe_dial_error``; the kind tells a real failure from
    ``RECENT`` (py-libp2p did not dial at all: the last failure, already known, stands)."""
    for addr in addrs:
        text = str(addr)
        try:
            host, port, _ = split_peer_addr(text if "/p2p/" in text else f"{text}/p2p/{expected}")
        except ValueError:
            continue
        return dial_failure(exc, host, port, expected, timeout)[:2]
    return dial_failure(exc, "?", 0, expected, timeout)[:2]


async def aprobe_bootstrap(addr: str, timeout: float = 5.0) -> ProbeResult:
    """Dial one ``/.../tcp/P/p2p/ID`` address from a throwaway host and say what happened.

    A plain TCP connect first (refused, timed out, no route, no such host), then a libp2p
    dial (Noise handshake) that checks the peer id. The throwaway host has a fresh key and
    never listens, so the probe does not disturb a running node's connections or its dialer's
    negative cache. Never raises for a network failure; bounded by about ``2 * timeout``.
    """
    try:
        host, port, expected = split_peer_addr(addr)
        peer = ID.from_base58(expected)
    except ValueError as exc:
        return ProbeResult(addr, BAD_ADDRESS, str(exc))
    started = time.monotonic()
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
        await stream.aclose()
    except Exception as exc:
        kind, words, _ = dial_failure(exc, host, port, expected, timeout)
        return ProbeResult(addr, kind, words)
    from libp2p.crypto.ed25519 import create_new_key_pair

    from volunteer.net.host import build_host, quiet_libp2p_logging, run_host

    quiet_libp2p_logging()  # its dial errors are logged at ERROR with tracebacks; ours is the answer
    probe_host = build_host(create_new_key_pair())
    try:
        async with run_host(probe_host, []):
            with trio.fail_after(timeout):
                await probe_host.connect(PeerInfo(peer, dialable([addr])))
    except Exception as exc:
        kind, words, got = dial_failure(exc, host, port, expected, timeout, tcp_ok=True)
        return ProbeResult(addr, kind, words, got)
    return ProbeResult(addr, OK, None, expected, round(time.monotonic() - started, 4))


async def aprobe_bootstraps(addrs: Sequence[str], timeout: float = 5.0) -> list[ProbeResult]:
    """``aprobe_bootstrap`` of the first ``MAX_PROBES`` addresses, concurrently, in order."""
    addrs = list(addrs)[:MAX_PROBES]
    results: list[ProbeResult | None] = [None] * len(addrs)

    async def one(i: int) -> None:
        results[i] = await aprobe_bootstrap(addrs[i], timeout)

    async with trio.open_nursery() as nursery:
        for i in range(len(addrs)):
            nursery.start_soon(one, i)
    return [r for r in results if r is not None]


def probe_bootstraps(addrs: Sequence[str], timeout: float = 5.0) -> list[ProbeResult]:
    """``aprobe_bootstraps`` from synchronous code (runs its own trio loop: not from inside
    one). What the daemon logs when no bootstrap peer answered, and what ``doctor`` checks."""
    return trio.run(aprobe_bootstraps, list(addrs), timeout)


def probe_bootstrap(addr: str, timeout: float = 5.0) -> ProbeResult:
    """``aprobe_bootstrap`` of one address from synchronous code (see ``probe_bootstraps``)."""
    return probe_bootstraps([addr], timeout)[0]

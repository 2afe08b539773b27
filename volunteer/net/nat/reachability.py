"""Reachability: is this node publicly dialable? Decided by a dial-back over a NEW connection.

py-libp2p's AutoNAT v1 gives false positives: its dial-back reuses the connection the
question came on, so a NATed node hears "reachable". Here a node A asks a peer B (a
bootstrap/relay node) on protocol ``/volunteer/dialback/1.0.0`` to dial A's listen ports.
B opens a *fresh* TCP connection to ``<the IP it sees A at>:<port>`` (its own transport, a
new socket and an ephemeral source port, not registered in its swarm), runs the Noise
handshake and checks that the peer id proven in it is A's. Only a NAT that forwards
unsolicited inbound connections (or no NAT) lets that through.

Abuse bounds on the server: it only dials the requester's own observed IP (never an
address the requester names), at most ``MAX_PORTS`` ports, one check per peer at a time,
``MAX_CONCURRENT_CHECKS`` in all, requests are <= ``MAX_MESSAGE_BYTES`` of msgpack with a
read deadline; relayed requests are refused (the observed IP would be the relay's).

``decide`` turns answers into public / private / unknown (a pure function), and
``explain`` tells the user why a node cannot be reached and what to do about it.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from volunteer.net.nat.connections import RELAYED, is_relayed

logger = logging.getLogger(__name__)

DIALBACK_PROTOCOL = TProtocol("/volunteer/dialback/1.0.0")
MAX_MESSAGE_BYTES = 2048
MAX_PORTS = 4
MAX_CONCURRENT_CHECKS = 8
READ_TIMEOUT = 5.0
DIAL_TIMEOUT = 5.0

PUBLIC = "public"
PRIVATE = "private"
UNKNOWN = "unknown"


class DialbackError(Exception):
    """A dial-back exchange failed (bad message, refused, timed out)."""


# ----------------------------------------------------------------- framing
async def _read_exactly(stream: INetStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise DialbackError("stream closed mid-message")
        buf += chunk
    return bytes(buf)


async def write_message(stream: INetStream, message: dict) -> None:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_MESSAGE_BYTES:
        raise DialbackError("message too large")
    await stream.write(struct.pack(">I", len(body)) + body)


async def read_message(stream: INetStream) -> dict:
    """One length-prefixed msgpack map; the length is checked before the body is read."""
    (length,) = struct.unpack(">I", await _read_exactly(stream, 4))
    if length > MAX_MESSAGE_BYTES:
        raise DialbackError(f"message of {length} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        message = msgpack.unpackb(await _read_exactly(stream, length), raw=False,
                                  max_bin_len=MAX_MESSAGE_BYTES, max_str_len=MAX_MESSAGE_BYTES)
    except DialbackError:
        raise
    except Exception as e:
        raise DialbackError(f"malformed message: {e}") from e
    if not isinstance(message, dict):
        raise DialbackError("message is not a map")
    return message


def _valid_ports(value: Any) -> list[int]:
    if not isinstance(value, list) or not value or len(value) > MAX_PORTS:
        raise DialbackError(f"'ports' must be a list of 1..{MAX_PORTS} ports")
    ports = []
    for p in value:
        if not isinstance(p, int) or isinstance(p, bool) or not 0 < p < 65536:
            raise DialbackError(f"bad port {p!r}")
        if p not in ports:
            ports.append(p)
    return ports


# ----------------------------------------------------------------- server side
class DialbackServer:
    """Answers dial-back requests; register with ``host.set_stream_handler``."""

    def __init__(self, host: IHost, dial_timeout: float = DIAL_TIMEOUT) -> None:
        self.host = host
        self.dial_timeout = dial_timeout
        self._limiter = trio.Semaphore(MAX_CONCURRENT_CHECKS)
        self._busy: set[ID] = set()
        self.checks_served = 0

    def install(self) -> None:
        self.host.set_stream_handler(DIALBACK_PROTOCOL, self.handle)

    async def handle(self, stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id
        try:
            with trio.fail_after(READ_TIMEOUT):
                request = await read_message(stream)
            reply = await self._answer(stream, peer_id, request)
        except (DialbackError, trio.TooSlowError) as e:
            reply = {"v": 1, "error": f"bad request: {e}" if str(e) else "timeout"}
        except Exception as e:  # never let a request crash the handler task
            logger.debug("dial-back handler error: %s", e)
            reply = {"v": 1, "error": "internal"}
        with contextlib.suppress(Exception):
            with trio.fail_after(READ_TIMEOUT):
                await write_message(stream, reply)
        with contextlib.suppress(Exception):
            await stream.close()

    async def _answer(self, stream: INetStream, peer_id: ID, request: dict) -> dict:
        ports = _valid_ports(request.get("ports"))
        if is_relayed(stream.muxed_conn) or RELAYED in _conn_kind_hint(stream):
            return {"v": 1, "error": "request came over a relay; dial me directly"}
        remote = stream.muxed_conn.get_remote_address()
        if not remote:
            return {"v": 1, "error": "cannot tell your address"}
        ip = str(remote[0])
        if peer_id in self._busy:
            return {"v": 1, "error": "a check for you is already running"}
        self._busy.add(peer_id)
        try:
            async with self._limiter:
                reachable: list[str] = []
                async with trio.open_nursery() as nursery:
                    for port in ports:
                        nursery.start_soon(self._probe, peer_id, ip, port, reachable)
        finally:
            self._busy.discard(peer_id)
        self.checks_served += 1
        return {"v": 1, "observed_ip": ip, "reachable": sorted(reachable)}

    async def _probe(self, peer_id: ID, ip: str, port: int, out: list[str]) -> None:
        if await dial_fresh(self.host, peer_id, f"/ip4/{ip}/tcp/{port}", self.dial_timeout):
            out.append(f"/ip4/{ip}/tcp/{port}")


def _conn_kind_hint(stream: INetStream) -> str:
    getter = getattr(stream.muxed_conn, "get_transport_addresses", None)
    with contextlib.suppress(Exception):
        if callable(getter) and any("/p2p-circuit" in str(a) for a in getter() or []):
            return RELAYED
    return ""


async def dial_fresh(host: IHost, peer_id: ID, addr: str, timeout: float) -> bool:
    """Open a brand-new TCP connection to ``addr`` and prove ``peer_id`` with Noise.

    The connection never enters the swarm (so no existing connection can be reused by
    accident) and is closed at once. True only when the handshake proved ``peer_id``.
    """
    network = host.get_network()
    maddr = Multiaddr(addr)
    transport = network.transport_manager.transport_for_dialing(maddr)
    if transport is None:
        return False
    raw = None
    secured = None
    try:
        with trio.fail_after(timeout):
            raw = await transport.dial(maddr)
            secured = await network.upgrader.upgrade_security(raw, True, peer_id)
        return secured.get_remote_peer() == peer_id
    except Exception as e:
        logger.debug("dial-back to %s failed: %s", addr, e)
        return False
    finally:
        for conn in (secured, raw):
            if conn is not None:
                with contextlib.suppress(Exception):
                    with trio.move_on_after(1.0):
                        await conn.close()


# ----------------------------------------------------------------- client side
@dataclass
class DialbackAnswer:
    """One server's answer (or why there was none)."""

    server: str
    observed_ip: str | None = None
    reachable: list[str] = field(default_factory=list)
    error: str | None = None


def listen_ports(host: IHost) -> list[int]:
    """The TCP ports this host listens on (non-relay addresses)."""
    ports: list[int] = []
    for a in host.get_addrs():
        if "/p2p-circuit" in str(a):
            continue
        with contextlib.suppress(Exception):
            port = int(a.value_for_protocol("tcp"))
            if port not in ports:
                ports.append(port)
    return ports[:MAX_PORTS]


async def ask_dialback(host: IHost, server: ID, ports: list[int],
                       timeout: float = 15.0) -> DialbackAnswer:
    """Ask ``server`` (already connected or dialable) to dial our ``ports`` back."""
    answer = DialbackAnswer(server=server.to_base58())
    try:
        with trio.fail_after(timeout):
            stream = await host.new_stream(server, [DIALBACK_PROTOCOL])
            try:
                await write_message(stream, {"v": 1, "ports": ports})
                reply = await read_message(stream)
            finally:
                with contextlib.suppress(Exception):
                    await stream.close()
    except trio.TooSlowError:
        answer.error = "timed out"
        return answer
    except Exception as e:
        answer.error = f"{type(e).__name__}: {e}"
        return answer
    if reply.get("error"):
        answer.error = str(reply["error"])[:200]
        return answer
    observed = reply.get("observed_ip")
    answer.observed_ip = observed if isinstance(observed, str) and len(observed) < 64 else None
    got = reply.get("reachable")
    if isinstance(got, list):
        answer.reachable = [a for a in got[:MAX_PORTS] if isinstance(a, str) and len(a) < 128]
    return answer


def decide(answers: list[DialbackAnswer]) -> str:
    """public if any server reached us on a fresh connection; private if at least one
    server answered and none reached us; unknown when nobody answered."""
    if any(a.error is None and a.reachable for a in answers):
        return PUBLIC
    if any(a.error is None for a in answers):
        return PRIVATE
    return UNKNOWN


def explain(status: str, ports: list[int], observed_ip: str | None, relay_addrs: list[str],
            relays_configured: int, bootstrap_origins: Sequence[str] = ()) -> str | None:
    """A one-paragraph message for the user when the node is not publicly reachable.
    ``bootstrap_origins``: where each bootstrap address came from, in words ("the
    --bootstrap flag"), so the advice names what to fix."""
    port_txt = ", ".join(str(p) for p in ports) or "<your listen port>"
    seen = f" (peers see you at {observed_ip})" if observed_ip else ""
    forward = (f"forward TCP port {port_txt} on your router to this machine and set "
               f"network.announce_addrs to /ip4/{observed_ip or '<public ip>'}/tcp/{ports[0] if ports else '<port>'}")
    if status == PUBLIC:
        return None
    if status == UNKNOWN:
        origins = list(dict.fromkeys(bootstrap_origins))
        peers = (f"the bootstrap peers (addresses from {' and '.join(origins)})" if origins
                 else "the relays in the manifest's network.relays")
        return ("Reachability unknown: no bootstrap/relay peer answered the dial-back check. "
                f"Check that {peers} are up and that outbound TCP is allowed.")
    if relay_addrs:
        return (f"This node is behind a NAT{seen}: other volunteers cannot dial it directly. "
                f"It is reachable through a relay ({relay_addrs[0]}) and upgrades to direct "
                f"connections by hole punching when it can. For full speed, {forward}.")
    if relays_configured:
        return (f"This node is behind a NAT{seen} and could not reserve a slot on any relay, "
                f"so nobody can reach it. Fix: {forward}, or add a reachable relay to the "
                "manifest (network.relays: [/ip4/R/tcp/P/p2p/<relay peer id>]).")
    return (f"This node is behind a NAT{seen} and no relay is configured, so nobody can reach "
            f"it. Fix: {forward}, or add a relay to the manifest (network.relays: "
            "[/ip4/R/tcp/P/p2p/<relay peer id>]).")

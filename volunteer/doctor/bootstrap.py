"""Can this machine reach the bootstrap peers? A plain TCP connect first, in plain words.

libp2p wraps a dead bootstrap peer in layers of exception groups; a volunteer needs
"connection refused at 203.0.113.7:4001", "timed out", "no such host". ``probe_tcp`` opens
one TCP connection (bounded by ``timeout``) to the address of a ``/ip4|ip6|dns*/.../tcp/P``
multiaddr and closes it again; whether the peer behind it is the one the ``/p2p/<id>`` names
is the libp2p stage's question (``volunteer.doctor.network``). Each address also says where
it came from (``--bootstrap`` flag, or the manifest), so the fix names the right place.
"""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import dataclass

from volunteer.doctor.report import Check, failed, ok, skipped, warn

ADDR_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")


@dataclass(frozen=True)
class Target:
    """A bootstrap address split into what a TCP probe needs."""

    addr: str
    source: str  # "flag" or "manifest"
    host: str
    port: int
    peer_id: str

    @property
    def where(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TcpResult:
    target: Target
    error: str | None  # None: the TCP connection opened
    rtt_s: float | None = None


def parse_target(addr: str, source: str) -> Target:
    """``/ip4/H/tcp/P/p2p/ID`` -> ``Target``; ValueError naming what is missing."""
    from multiaddr import Multiaddr

    try:
        parsed = Multiaddr(addr)
    except Exception as exc:  # the multiaddr parser raises several unrelated types
        raise ValueError(f"{addr!r} is not a multiaddr ({exc})") from None
    parts = {p.name: parsed.value_for_protocol(p.code) for p in parsed.protocols()}
    host = next((parts[n] for n in ADDR_PROTOCOLS if n in parts), None)
    if host is None or "tcp" not in parts or "p2p" not in parts:
        raise ValueError(f"{addr!r}: expected /ip4/HOST/tcp/PORT/p2p/<peer id>")
    return Target(addr, source, str(host), int(parts["tcp"]), str(parts["p2p"]))


def probe_tcp(target: Target, timeout: float) -> TcpResult:
    """One TCP connect to the target (closed at once); the failure in plain words."""
    start = time.monotonic()
    try:
        with socket.create_connection((target.host, target.port), timeout=timeout):
            return TcpResult(target, None, round(time.monotonic() - start, 4))
    except socket.gaierror as exc:
        return TcpResult(target, f"cannot resolve {target.host} ({exc.strerror or exc})")
    except TimeoutError:
        return TcpResult(target, f"timed out after {timeout:g} s at {target.where}")
    except ConnectionRefusedError:
        return TcpResult(target, f"connection refused at {target.where}")
    except OSError as exc:
        if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return TcpResult(target, f"no route to {target.where} ({exc.strerror})")
        return TcpResult(target, f"{exc.strerror or exc} at {target.where}")


def fix_for(source: str) -> str:
    if source == "flag":
        return "check the --bootstrap address (copy it from `volunteer status` on that peer) and that the peer runs"
    return ("the manifest's network.bootstrap peer is down or the address is stale: pass a live one "
            "with --bootstrap (ask the experiment, or copy it from `volunteer status` on a running peer)")


def check_bootstrap(results: list[TcpResult]) -> list[Check]:
    """One check per address, plus the verdict: no reachable bootstrap peer fails the node."""
    if not results:
        return [skipped("bootstrap", "no bootstrap peer configured: this node would start a new swarm "
                        "(others join it with --bootstrap <its address>)")]
    out: list[Check] = []
    for r in results:
        name = "bootstrap"
        if r.error is None:
            out.append(ok(name, f"{r.target.where} answers TCP in {r.rtt_s * 1000:.0f} ms (from the {r.target.source})",
                          addr=r.target.addr, source=r.target.source, rtt_s=r.rtt_s))
        else:
            out.append(warn(name, f"{r.error} (address from the {r.target.source}: {r.target.addr})",
                            fix_for(r.target.source), addr=r.target.addr, source=r.target.source,
                            error=r.error))
    if all(r.error is not None for r in results):
        out.append(failed("bootstrap", f"none of the {len(results)} bootstrap peer(s) is reachable: "
                          "this node would join no swarm, and no trainer could find it",
                          fix_for(results[0].target.source)))
    return out

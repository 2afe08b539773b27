"""Can this machine reach the bootstrap peers? Each address dialled, the answer in plain words.

The dial itself is the network layer's ``volunteer.net.dialing.probe_bootstraps`` (the same
probe the daemon logs when no bootstrap peer answers): a plain TCP connect, then a libp2p
handshake from a throwaway host that checks the ``/p2p/<peer id>``, each bounded by a
timeout. It says "connection refused at 203.0.113.7:4001", "timed out", "cannot resolve",
"wrong peer id at ...: expected X, got Y". Here those results become checks, each naming
where its address came from (``origin_of``: the ``--bootstrap`` flag, the manifest, the
daemon of this home), so the fix points at the right place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from volunteer.doctor.report import Check, failed, ok, skipped, warn

PROBE_TIMEOUT_S = 3.0
MAX_ADDRS = 16  # dialled concurrently; the rest are not needed to judge the swarm


def probe(addrs: Sequence[str], timeout: float = PROBE_TIMEOUT_S) -> list[Any]:
    """``dialing.ProbeResult`` per address (libp2p loads only when there is one to dial)."""
    if not addrs:
        return []
    from volunteer.net.dialing import probe_bootstraps

    return probe_bootstraps(list(addrs)[:MAX_ADDRS], timeout)


def fix_for(origin: str) -> str:
    """What to do about a dead bootstrap address, given where it came from."""
    if "--bootstrap" in origin:
        return "check the --bootstrap address (copy it from `volunteer status` on that peer) and that the peer runs"
    if "daemon" in origin:
        return "the daemon on this home is not in the swarm: see `volunteer status` there"
    return ("the manifest's network.bootstrap peer is down or the address is stale: pass a live one "
            "with --bootstrap (ask the experiment, or copy it from `volunteer status` on a running peer)")


def check_bootstrap(results: Sequence[Any], origin_of: Callable[[str], str]) -> list[Check]:
    """One check per address, then the verdict: no peer answering fails the node (it would
    join no swarm, and no trainer could find it). Each fix is said once: when none answered,
    under the failing verdict only; else under the first dead address it applies to."""
    if not results:
        return [skipped("bootstrap", "no bootstrap peer configured: this node would start a new swarm "
                        "(others join it with --bootstrap <its address>)")]
    none_answered = not any(r.ok for r in results)
    out: list[Check] = []
    fixes: list[str] = []
    for r in results:
        origin = origin_of(r.addr)
        data = {"addr": r.addr, "origin": origin, "kind": r.kind}
        if r.ok:
            rtt = f" in {r.rtt_s * 1000:.0f} ms" if r.rtt_s is not None else ""
            out.append(ok("bootstrap", f"{r.addr} answered (libp2p handshake{rtt}; address from {origin})",
                          rtt_s=r.rtt_s, **data))
            continue
        fix = fix_for(origin)
        first = fix not in fixes
        if first:
            fixes.append(fix)
        out.append(warn("bootstrap", f"{r.problem} (address from {origin}: {r.addr})",
                        fix if first and not none_answered else "", error=r.problem, **data))
    if none_answered:
        out.append(failed("bootstrap", f"none of the {len(results)} bootstrap peer(s) answered: this node would "
                          "join no swarm, and no trainer could find it", "; ".join(fixes)))
    return out
